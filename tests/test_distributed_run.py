"""End to end on 2 processes: `aepo run trainer.nproc=2` for 2 iterations on the real base policy (the
update stage under torchrun, FSDP2 on CPU), its artifacts intact and complete, then the same run
resumed for a third iteration on 1 process (`trainer.nproc=1`): nothing done before is recomputed and
the single-process update continues from the 2-rank optimiser state."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aepo_core.config import load_config
from aepo_core.io.sharded import OPTIMIZER_DCP, OPTIMIZER_FILE
from aepo_core.pipeline.rundir import RunDir
from aepo_core.pipeline.stages import STAGES, is_stage_complete, stages_of

pytestmark = pytest.mark.slow


def aepo_run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1")
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "aepo_core.cli", "run", "--no-progress", *args], env=env,
                          capture_output=True, text=True, timeout=3600)  # a hang guard, not a speed check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_a_run_on_two_ranks_completes_validates_and_resumes_on_one(base_policy_dir, tmp_path, tiny_overrides):
    run_dir = tmp_path / "runs" / "two"
    overrides = tiny_overrides(base_policy_dir, tmp_path / "runs")
    first = aepo_run(["--run-dir", str(run_dir), "--iterations", "2", *overrides, "trainer.nproc=2",
                      "run.keep_optimizer_states=2", "run.keep_policies_every=1"], tmp_path)
    assert "finished 2 iterations" in first.stdout
    run = RunDir(run_dir)
    cfg = run.config()
    assert cfg.trainer.nproc == 2
    for i in range(2):
        for stage in stages_of(cfg, i):
            assert is_stage_complete(run, cfg, i, stage), (i, stage)
            assert run.damage(i, stage) is None, (i, stage)
        update = run.stage_dir(i, "update")
        assert (update / OPTIMIZER_DCP / ".metadata").is_file() and not (update / OPTIMIZER_FILE).exists()
        assert (update / "policy" / "model.safetensors").is_file()
        metrics = run.manifest(i, "update")["metrics"]
        assert metrics["actor/optimizer_steps"] >= 1 and metrics["entropy/nll"] > 0

    # resumed on one process: the execution-only key changes no digest, so iterations 0-1 stay done
    done_before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("_SUCCESS.json")}
    resumed = aepo_run(["--run-dir", str(run_dir), "--iterations", "3", "trainer.nproc=1"], tmp_path)
    assert "done before: prepare, rollout, reward, update, entropy" in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    assert load_config(run.config_path).trainer.nproc == 1
    assert (run.stage_dir(2, "update") / OPTIMIZER_FILE).is_file()  # read the 2-rank DCP state, wrote its own
    for stage in STAGES:
        if stage in stages_of(run.config(2), 2):
            assert run.damage(2, stage) is None, stage
