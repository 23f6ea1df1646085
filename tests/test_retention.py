"""Checkpoint retention: what a run keeps, pruning after each iteration, resume and refused reruns."""

from __future__ import annotations

import json

import pytest

from aepo_core.config import load_config
from aepo_core.pipeline.retention import OPTIMIZER, OPTIMIZER_DIR, POLICY, PrunedArtifact, keeps
from aepo_core.pipeline.rundir import MANIFEST, RunDir


def test_what_is_kept_computed_by_hand():
    cfg = load_config(None, ["run.iterations=10", "tracking.save_every=4",
                             "run.keep_optimizer_states=2"])
    newest = 7
    # optimiser states: the newest two (6, 7)
    assert [i for i in range(newest + 1) if keeps(cfg, OPTIMIZER, i, newest)] == [6, 7]
    # a distributed update's optimiser state (a DCP folder) is kept exactly as long
    assert [i for i in range(newest + 1) if keeps(cfg, OPTIMIZER_DIR, i, newest)] == [6, 7]
    # policies: every 4th iteration (3, 7) and the newest (5 while 5 is the newest)
    assert [i for i in range(newest + 1) if keeps(cfg, POLICY, i, newest)] == [3, 7]
    assert [i for i in range(6) if keeps(cfg, POLICY, i, 5)] == [3, 5]
    # the last iteration's is always kept; keep_policies_every overrides save_every
    cfg = load_config(None, ["run.iterations=10", "run.keep_policies_every=3"])
    assert [i for i in range(10) if keeps(cfg, POLICY, i, 9)] == [2, 5, 8, 9]


@pytest.mark.slow
def test_a_run_prunes_resumes_and_refuses_reruns_that_need_what_it_pruned(
    base_policy_dir, tmp_path, prefect_harness, tiny_overrides, capsys
):
    from flows.rerun import rerun_stage
    from flows.train import train

    overrides = tiny_overrides(base_policy_dir, tmp_path) + ["run.keep_policies_every=2", "evaluation.every=4"]
    result = train(overrides=overrides, iterations=4)
    run = RunDir(result["run_dir"])
    present = {i: sorted(p.name for p in run.stage_dir(i, "update").iterdir()) for i in range(4)}
    # optimiser: the newest only; policies: every 2nd (1, 3) and the last (3)
    assert present[0] == ["_PRUNED.json", MANIFEST, "update_batch.parquet"]
    assert "optimizer.pt" not in present[1] and "policy" in present[1]
    assert "optimizer.pt" not in present[2] and "policy" not in present[2]
    assert {"optimizer.pt", "policy"} <= set(present[3])
    pruned = run.pruned(2, "update")
    assert set(pruned) == {"policy/", "optimizer.pt"}
    assert "run.keep_optimizer_states" in pruned["optimizer.pt"]["setting"]
    assert run.manifest(2, "update")["files"]["optimizer.pt"]  # the record of what was there, and its digest, stay

    # pruned is not damaged: a resume finds every stage done and rewrites nothing (manifests included)
    mtimes = {str(p): p.stat().st_mtime_ns for p in run.root.rglob(MANIFEST)}
    capsys.readouterr()
    train(run_dir=result["run_dir"])
    assert "recomputing" not in capsys.readouterr().out
    assert {str(p): p.stat().st_mtime_ns for p in run.root.rglob(MANIFEST)} == mtimes

    # a longer run continues from the kept newest policy and optimiser state, and prunes iteration 3's state
    train(run_dir=result["run_dir"], iterations=5)
    assert (run.stage_dir(4, "update") / "optimizer.pt").is_file()
    assert not (run.stage_dir(3, "update") / "optimizer.pt").exists()
    assert (run.stage_dir(3, "update") / "policy").is_dir()  # every 2nd: kept

    # reruns that need a pruned file are refused before anything changes, naming it and the setting
    config = run.config_path.read_text()
    mtimes = {str(p): p.stat().st_mtime_ns for p in run.root.rglob(MANIFEST)}
    with pytest.raises(PrunedArtifact, match=r"update of iteration 2 needs .*iter_0001/update/optimizer\.pt.*"
                                             r"run\.keep_optimizer_states"):
        rerun_stage(result["run_dir"], 2, "update", overrides=["trainer.lr=0.002"])
    # the reward of iteration 1 feeds its update, which would need iteration 0's pruned state
    with pytest.raises(PrunedArtifact, match=r"update of iteration 1 needs .*iter_0000/update/policy.*rerunning reward "
                                             r"of iteration 1 can change.*keep_policies_every=1"):
        rerun_stage(result["run_dir"], 1, "reward")
    with pytest.raises(PrunedArtifact, match=r"evaluate of iteration 2 needs .*iter_0002/update/policy.*keep_policies_every"):
        rerun_stage(result["run_dir"], 2, "evaluate")
    from aepo_core.pipeline.diagnostics import PolicyNotFound, entropy_push
    from flows.evaluate import evaluate

    with pytest.raises(PrunedArtifact, match=r"iter_0002/update/policy, which retention pruned"):
        evaluate(run_dir=result["run_dir"], iteration=2)
    with pytest.raises(PolicyNotFound, match=r"iter_0002/update/policy, which retention pruned"):
        entropy_push(None, [], run.root, 3, None)
    assert run.config_path.read_text() == config
    assert {str(p): p.stat().st_mtime_ns for p in run.root.rglob(MANIFEST)} == mtimes
    # what nothing downstream depends on and is kept can be rerun
    assert rerun_stage(result["run_dir"], 3, "evaluate")["stale"] == []
    # the MLflow record still names every iteration's checkpoint (uploaded every save_every)
    checkpoints = json.loads((run.root / "mlflow.json").read_text())["checkpoints"]
    assert sorted(checkpoints) == ["0000", "0001", "0002", "0003", "0004"]
