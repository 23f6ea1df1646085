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
                 "  ad: [algorithm.combine=add, algorithm.controller=adaptive, algorithm.target_entropy=0.1, "
                 "algorithm.entropy_lookahead=true]\n")
    first = _loop(plan, "--parallel", "2", "run.iterations=1")  # stopped after one iteration ...
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["started", "started"]  # both at once
    iteration0 = {name: RunDir(tmp_path / "runs" / name).manifest(0, "update") for name in ("grpo-s0", "ad-s0")}
    done = _loop(plan, "--parallel", "2")  # ... and resumed to the plan's two
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 runs finished" in done.stdout
    for name in ("grpo-s0", "ad-s0"):
        run = RunDir(tmp_path / "runs" / name)
        assert run.manifest(0, "update") == iteration0[name]  # not recomputed
        assert run.manifest(-1, "evaluate") is not None  # the starting policy's evaluation, as the flow's
        for stage in ("prepare", "rollout", "reward", "update", "entropy", "evaluate"):
            assert run.manifest(1, stage) is not None, (name, stage)
        log = (tmp_path / "runs" / f"{name}.log").read_text()
        assert log.count("=== ") == 2 and "iter 0001/0002" in log
        assert run.config().run.threads is None  # one thread from the environment, not stored
    decision = json.loads((tmp_path / "runs" / "ad-s0" / "iter_0001" / "entropy" / "controller.json").read_text())
    assert decision["target"] == 0.1 and 0.6 <= decision["next_temperature"] <= 1.5
    # the look-ahead: the controller read the policy rows' entropy ahead, the target stays on the
    # policy's own reading, and the update measured both
    measured = RunDir(tmp_path / "runs" / "ad-s0").manifest(1, "update")["metrics"]
    assert decision["measured"]["read"] == "entropy/nll_policy_rows_ahead"
    assert decision["measured"]["read_value"] == measured["entropy/nll_policy_rows_ahead"]
    assert decision["measured"]["target_value"] == measured["entropy/nll_policy_rows"]
    assert decision["measured"]["read_value"] != decision["measured"]["target_value"]
    assert decision["state"]["h_prev"] == decision["measured"]["read_value"]


def test_a_run_that_fails_is_reported_and_the_others_finish(tmp_path, base_policy_dir):
    plan = _plan(tmp_path, base_policy_dir,
                 f"  good: [algorithm.name=grpo]\n  broken: [model.path={tmp_path / 'no-such-policy'}]\n")
    done = _loop(plan, "run.iterations=1")
    assert done.returncode == 1
    assert "FAILED (exit" in done.stdout and "1 of 2 runs finished; failed: broken-s0" in done.stdout
    assert "no-such-policy" in (tmp_path / "runs" / "broken-s0.log").read_text()
    assert RunDir(tmp_path / "runs" / "good-s0").manifest(0, "entropy") is not None


def test_a_bad_override_is_refused_before_any_run_starts(tmp_path, base_policy_dir):
    plan = _plan(tmp_path, base_policy_dir, "  good: [algorithm.name=grpo]\n  bad: [algorithm.alpah=2]\n")
    done = _loop(plan)
    assert done.returncode != 0
    assert "algorithm.alpah" in done.stderr
    assert not (tmp_path / "runs").exists()
