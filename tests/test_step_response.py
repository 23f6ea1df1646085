"""scripts/step_response.py: copies of a finished run continued with the regulariser's temperature
fixed (the open-loop step response of docs/results.md), the run itself left as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aepo_core.pipeline.rundir import RunDir
from aepo_core.pipeline.stages import PIPELINE, open_run, run_iteration

SCRIPT = Path(__file__).parents[1] / "scripts" / "step_response.py"
pytestmark = pytest.mark.slow


def test_copies_continue_at_fixed_temperatures_and_the_run_is_left_alone(tmp_path, base_policy_dir, one_thread):
    run = open_run(None, None, None, [
        f"model.path={base_policy_dir}", f"run.runs_root={tmp_path}", "run.name=source", "run.iterations=2",
        "run.evaluate_base=false", "data.synthetic.n_train=64", "data.synthetic.n_eval=8",
        "rollout.prompts_per_batch=4", "rollout.n=3", "rollout.max_new_tokens=32", "algorithm.reinforce_sample_num=2",
        "algorithm.reg_prompt_fraction=0.5", "algorithm.combine=add", "algorithm.controller=adaptive",
        "algorithm.target_entropy=0.1", "evaluation.every=10", "evaluation.n=2", "evaluation.num_prompts=4"])
    try:
        for i in range(2):
            run_iteration(run, i, lambda name, it: PIPELINE[name](run, it))
    finally:
        run.release_writer()
    source = tmp_path / "source"
    before = sorted(p.name for p in source.iterdir())
    last_decision = json.loads((source / "iter_0001" / "entropy" / "controller.json").read_text())["next_temperature"]

    out = tmp_path / "step"
    done = subprocess.run([sys.executable, str(SCRIPT), str(source), "--temperatures", "0.7,1.4", "--iterations", "2",
                           "--out", str(out), "--parallel", "2"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    step = json.loads((out / "step.json").read_text())
    assert (out / "step.png").stat().st_size > 0
    assert step["start"] == 2 and set(step["temperatures"]) == {"0.7", "1.4"}
    for t, s in step["temperatures"].items():
        # the first new iteration samples at the run's own last decision, the second at T
        assert s["temperature"] == [pytest.approx(last_decision, rel=1e-6), pytest.approx(float(t), rel=1e-6)]
        assert len(s["entropy"]) == 2 and all(h > 0 for h in s["entropy"])
        copy = RunDir(out / f"T{t}")
        assert copy.config().run.iterations == 4
        assert (copy.config(1).algorithm.controller, copy.config(2).algorithm.controller) == ("adaptive", "fixed")
        assert copy.manifest(1, "update") == RunDir(source).manifest(1, "update")  # continued, not recomputed
    assert "T  1.4: " in done.stdout
    assert sorted(p.name for p in source.iterdir()) == before  # nothing added to the run (no lock, no iteration)
    assert RunDir(source).config().run.iterations == 2
