"""scripts/stage_loop.py: a sweep plan's runs, several at once, through the stage functions without
Prefect or MLflow; complete run directories that resume, and a bad plan refused before any run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aepo_core.pipeline.rundir import RunDir

SCRIPT = Path(__file__).parents[1] / "scripts" / "stage_loop.py"
pytestmark = pytest.mark.slow


def _plan(tmp_path, base_policy_dir, arms: str) -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "overrides:\n"
        + "".join(f"  - {o}\n" for o in (
            f"model.path={base_policy_dir}", f"run.runs_root={tmp_path / 'runs'}", "run.iterations=2",
            "data.synthetic.n_train=64", "data.synthetic.n_eval=8", "rollout.prompts_per_batch=4", "rollout.n=3",
            "rollout.max_new_tokens=32", "algorithm.reinforce_sample_num=2", "algorithm.reg_prompt_fraction=0.5",
            "evaluation.every=1", "evaluation.n=2", "evaluation.num_prompts=4"))
        + "arms:\n" + arms
    )
    return plan


def _loop(plan: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--plan", str(plan), *extra],
                          capture_output=True, text=True, timeout=600)


def test_runs_a_plan_two_at_a_time_and_resumes(tmp_path, base_policy_dir):
    plan = _plan(tmp_path, base_policy_dir,
                 "  grpo: [algorithm.name=grpo]\n"
                 "  ad: [algorithm.combine=add, algorithm.controller=adaptive, algorithm.target_entropy=0.1]\n")
    done = _loop(plan, "--parallel", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 runs finished" in done.stdout
    manifests = {}
    for name in ("grpo-s0", "ad-s0"):
        run = RunDir(tmp_path / "runs" / name)
        for stage in ("prepare", "rollout", "reward", "update", "entropy", "evaluate"):
            assert run.manifest(1, stage) is not None, (name, stage)
        manifests[name] = (run.stage_dir(1, "entropy") / "_SUCCESS.json").read_text()
        assert "iter 0001/0002" in (tmp_path / "runs" / f"{name}.log").read_text()
    decision = json.loads((tmp_path / "runs" / "ad-s0" / "iter_0001" / "entropy" / "controller.json").read_text())
    assert decision["target"] == 0.1 and 0.6 <= decision["next_temperature"] <= 1.5
    # again: every stage is already done, nothing is recomputed
    again = _loop(plan, "--parallel", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    for name, text in manifests.items():
        assert (tmp_path / "runs" / name / "iter_0001" / "entropy" / "_SUCCESS.json").read_text() == text


def test_a_bad_override_is_refused_before_any_run_starts(tmp_path, base_policy_dir):
    plan = _plan(tmp_path, base_policy_dir, "  good: [algorithm.name=grpo]\n  bad: [algorithm.alpah=2]\n")
    done = _loop(plan)
    assert done.returncode != 0
    assert "algorithm.alpah" in done.stderr
    assert not (tmp_path / "runs").exists()
