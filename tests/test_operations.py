"""Operating a run: single-stage reruns (and what becomes stale), Prefect artifacts, run comparison."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from aepo_core.pipeline.rundir import MANIFEST, RunDir, StageNotReady

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(base_policy_dir, tmp_path_factory, prefect_harness, tiny_overrides):
    from flows.train import train

    root = tmp_path_factory.mktemp("ops")
    # these tests rerun, damage and recompute iteration 0 after iteration 1: keep all its outputs
    # (retention's defaults, which prune them, are tested in test_retention.py)
    keep = tiny_overrides(base_policy_dir, root) + ["run.keep_optimizer_states=2", "run.keep_policies_every=1"]
    aepo = train(overrides=keep, iterations=2)
    grpo = train(overrides=keep + ["algorithm.name=grpo"], iterations=2)
    return root, aepo, grpo


def _mtimes(run: RunDir) -> dict:
    return {str(p.relative_to(run.root)): p.stat().st_mtime_ns for p in run.root.rglob(MANIFEST)}


def _history(result, key):
    from mlflow.tracking import MlflowClient

    rec = json.loads((RunDir(result["run_dir"]).root / "mlflow.json").read_text())
    return sorted((m.step, m.value) for m in MlflowClient(rec["tracking_uri"]).get_metric_history(rec["run_id"], key))


def test_prefect_artifacts_of_a_run(runs):
    from prefect.artifacts import Artifact

    from flows.train import artifact_key

    _, aepo, _ = runs
    run = RunDir(aepo["run_dir"])
    assert artifact_key(run, "metrics") == f"aepo-{run.root.name.replace('.', '-')}-metrics"
    table = Artifact.get(artifact_key(run, "metrics"))
    summary = Artifact.get(artifact_key(run, "summary"))
    assert table is not None and summary is not None
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["eval_accuracy"] is not None
    assert "final held-out accuracy" in summary.data and aepo["mlflow_run_id"] in summary.data
    assert (RunDir(aepo["run_dir"]).root / "plots" / "entropy.png").is_file()


def test_rerun_with_nothing_changed_keeps_everything_valid(runs):
    from flows.rerun import rerun_stage

    _, aepo, _ = runs
    run = RunDir(aepo["run_dir"])
    before = _mtimes(run)
    result = rerun_stage(aepo["run_dir"], 0, "reward")
    assert result == {"changed": False, "stale": [], "run_dir": str(run.root)}
    after = _mtimes(run)
    assert after.pop("iter_0000/reward/_SUCCESS.json") != before.pop("iter_0000/reward/_SUCCESS.json")
    assert after == before
    assert [s for s, _ in _history(aepo, "reward/reward_mean")] == [0, 1]


def test_rerun_evaluate_with_new_settings_replaces_its_points(runs, capsys):
    from flows.rerun import rerun_stage

    _, aepo, _ = runs
    run = RunDir(aepo["run_dir"])
    old_n = run.manifest(1, "evaluate")["metrics"]["n"]
    capsys.readouterr()
    result = rerun_stage(aepo["run_dir"], 1, "evaluate", overrides=["evaluation.n=3"])
    assert result["changed"] and result["stale"] == []
    # the new metrics are printed next to the old ones
    assert f"  n: {old_n:.4g} -> 3" in capsys.readouterr().out
    assert pq.read_table(run.stage_dir(1, "evaluate") / "eval.parquet").num_rows == 12 * 3
    assert run.config().evaluation.n == 3
    history = _history(aepo, "eval/n")
    # one point for the rerun iteration, the new value; the base policy's evaluation (step -1) keeps
    # the run's starting config
    assert history == [(-1, 2.0), (1, 3.0)]
    assert "evaluation.n=3" in (run.root / "config_history.jsonl").read_text()


def test_rerun_update_makes_downstream_stale_and_resume_recomputes_exactly_those(runs):
    from flows.rerun import rerun_stage
    from flows.train import train

    _, aepo, _ = runs
    run = RunDir(aepo["run_dir"])
    before = _mtimes(run)
    result = rerun_stage(aepo["run_dir"], 0, "update", overrides=["trainer.lr=0.002"])
    assert result["changed"]
    assert result["stale"] == ["0000/entropy", "0001/rollout", "0001/reward", "0001/update", "0001/entropy", "0001/evaluate"]
    middle = _mtimes(run)
    train(run_dir=aepo["run_dir"])
    after = _mtimes(run)
    untouched = ["iter_0000/prepare", "iter_0000/rollout", "iter_0000/reward", "iter_0001/prepare"]
    for stage in untouched:
        assert after[f"{stage}/_SUCCESS.json"] == before[f"{stage}/_SUCCESS.json"], stage
    assert after["iter_0000/update/_SUCCESS.json"] == middle["iter_0000/update/_SUCCESS.json"]
    for stale in result["stale"]:
        i, stage = stale.split("/")
        assert after[f"iter_{i}/{stage}/_SUCCESS.json"] != middle[f"iter_{i}/{stage}/_SUCCESS.json"], stale
    for key in ("entropy/nll", "reward/reward_mean", "time/update_s"):
        assert [s for s, _ in _history(aepo, key)] == [0, 1], key
    import torch

    # the optimiser state carries on, with the hyperparameters of the changed config
    saved = torch.load(run.stage_dir(1, "update") / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["lr"] == 0.002
    new_h = run.manifest(1, "update")["metrics"]["entropy/nll"]
    assert _history(aepo, "entropy/nll")[1][1] == pytest.approx(new_h)


def test_rerun_refuses_bad_requests(runs):
    from flows.rerun import rerun_stage

    _, aepo, _ = runs
    with pytest.raises(ValueError, match="unknown stage 'rewards'"):
        rerun_stage(aepo["run_dir"], 0, "rewards")
    with pytest.raises(ValueError, match="fixed when the run was created"):
        rerun_stage(aepo["run_dir"], 0, "prepare", overrides=["data.train=other.jsonl"])
    with pytest.raises(ValueError, match="outside this run"):
        rerun_stage(aepo["run_dir"], 7, "reward")
    with pytest.raises(StageNotReady, match="not a run directory"):
        rerun_stage(aepo["run_dir"] + "-missing", 0, "reward")
    run = RunDir(aepo["run_dir"])
    moved = run.stage_dir(1, "rollout").with_name("rollout-moved")
    run.stage_dir(1, "rollout").rename(moved)
    try:
        with pytest.raises(StageNotReady, match="iter_0001/rollout"):
            rerun_stage(aepo["run_dir"], 1, "reward", overrides=["data.verifier=math"])
        assert run.config().data.verifier == "synthetic"  # a refused rerun leaves the config alone
    finally:
        moved.rename(run.stage_dir(1, "rollout"))


def test_a_rerun_changes_what_comes_after_it_not_what_came_before(base_policy_dir, tmp_path, prefect_harness,
                                                                  tiny_overrides):
    """The overrides of a rerun apply from its iteration on (RunDir.config(i)): earlier stages keep
    the config they were computed with and stay valid, the stage just recomputed is not stale, and
    the run resumes with no overrides; a differing explicit value is refused with the command that
    continues the run."""
    from aepo_core.pipeline.stages import ConfigMismatch, check_start
    from flows.rerun import rerun_stage
    from flows.train import train

    keep = tiny_overrides(base_policy_dir, tmp_path) + [
        "run.keep_optimizer_states=3", "run.keep_policies_every=1", "evaluation.every=1"]
    run = RunDir(train(overrides=keep, iterations=3)["run_dir"])
    before = _mtimes(run)
    result = rerun_stage(str(run.root), 1, "reward", overrides=["data.verifier=math"])
    assert result["stale"] == ["0001/update", "0001/entropy", "0001/evaluate",
                               "0002/rollout", "0002/reward", "0002/update", "0002/entropy", "0002/evaluate"]
    assert [run.config(i).data.verifier for i in range(3)] == ["synthetic", "math", "math"]
    check_start(run_dir=str(run.root))  # no config, no overrides: the run's own (latest) config
    train(run_dir=str(run.root))
    after = _mtimes(run)
    assert after.pop("base/evaluate/_SUCCESS.json") == before.pop("base/evaluate/_SUCCESS.json")
    for name, mtime in before.items():
        stage = f"{int(name[5:9]):04d}/{name.split('/')[1]}"
        assert (after[name] != mtime) == (stage in result["stale"] or stage == "0001/reward"), stage
    # an evaluation rerun at the last iteration leaves the earlier evaluations valid
    assert rerun_stage(str(run.root), 2, "evaluate", overrides=["evaluation.n=3"])["stale"] == []
    assert [run.config(i).evaluation.n for i in range(3)] == [2, 2, 3]
    with pytest.raises(ConfigMismatch) as refused:
        check_start(run_dir=str(run.root), overrides=keep)  # the original settings, repeated
    lines = str(refused.value).splitlines()
    assert lines[1].startswith("  data.verifier: 'math' (run, since `rerun-stage` reward@1 at ")
    assert lines[1].endswith(") vs 'synthetic' (now)")
    assert lines[2].startswith("  evaluation.n: 3 (run, since `rerun-stage` evaluate@2 at ")
    assert lines[3] == (f"to continue this run with its own configuration: aepo run --run-dir {run.root} "
                        "(it has 3 iterations; add --iterations N to change that)")


def test_compare_two_runs(runs, tmp_path):
    from typer.testing import CliRunner

    from aepo_core.cli import app

    root, aepo, grpo = runs
    result = CliRunner().invoke(app, ["compare", "--tracking-uri", aepo["tracking_uri"], "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["run", "algorithm", "H*"]
    assert any(" aepo " in line for line in lines) and any(" grpo " in line for line in lines)
    for name in ("entropy", "temperature", "reward", "eval_accuracy"):
        assert (tmp_path / "cmp" / f"{name}.png").is_file()
    # what the comparison draws: the same plots, described instead of read back from the PNGs
    from aepo_core.pipeline.compare import PLOTS, compare_runs

    figures = {}
    rows, _ = compare_runs(aepo["tracking_uri"], tmp_path / "described", figures=figures)
    label = {r["algorithm"]: r["run"] for r in rows}
    assert set(figures) == set(PLOTS) | {"controller", "against_target"}
    for name, (_, ylabel) in PLOTS.items():
        (ax,) = figures[name]["axes"]
        xlabel = "iteration (-1: the base policy)" if name == "eval_accuracy" else "iteration"
        assert (ax["xlabel"], ax["ylabel"]) == (xlabel, ylabel), name
        assert label["aepo"] in ax["legend"], name
    for name in ("entropy", "reward", "eval_accuracy"):
        assert figures[name]["axes"][0]["legend"] == sorted(label.values()), name
    entropy = figures["entropy"]["axes"][0]
    # each run raw and smoothed over its 2 iterations, and the AEPO run's target (dashed)
    assert sorted(len(ln["x"]) for ln in entropy["lines"] if ln["linestyle"] == "-") == [2, 2, 2, 2]
    assert [ln["y"] for ln in entropy["lines"] if ln["linestyle"] == "--"] == [[0.3, 0.3]]
    assert [ax["title"] for ax in figures["controller"]["axes"] if ax["title"]] == [label["aepo"]]
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert {r["algorithm"] for r in summary} == {"aepo", "grpo"}
    only = CliRunner().invoke(app, ["compare", "--tracking-uri", aepo["tracking_uri"], "--filter",
                                    "tags.algorithm = 'grpo'", "--out", str(tmp_path / "g")])
    assert only.exit_code == 0 and " aepo " not in only.output
    # with no --out, the comparison lands beside the store it read, not in the current directory
    beside = CliRunner().invoke(app, ["compare", "--tracking-uri", aepo["tracking_uri"]])
    assert beside.exit_code == 0, beside.output
    assert (root / "comparison" / "summary.md").is_file() and f"table: {root / 'comparison' / 'summary.json'}" in beside.output


def test_sweep_trains_the_grid_and_compares_it(base_policy_dir, tmp_path, tiny_overrides, prefect_harness):
    from flows.sweep import sweep

    arms = {"grpo": ["algorithm.name=grpo"], "aepo-0.2": ["algorithm.target_entropy=0.2"]}
    result = sweep(arms=arms, seeds=[0, 1], iterations=1, overrides=tiny_overrides(base_policy_dir, tmp_path))
    names = sorted(RunDir(r["run_dir"]).root.name for r in result["runs"])
    assert names == ["aepo-0.2-s0", "aepo-0.2-s1", "grpo-s0", "grpo-s1"]
    seeds = {RunDir(r["run_dir"]).config().trainer.seed for r in result["runs"]}
    assert seeds == {0, 1}
    assert {p.rsplit("/", 1)[-1] for p in result["plots"]} >= {"entropy.png", "reward.png"}
    # a second call skips the finished runs and keeps the same MLflow runs
    again = sweep(arms=arms, seeds=[0, 1], iterations=1, overrides=tiny_overrides(base_policy_dir, tmp_path))
    assert [r["mlflow_run_id"] for r in again["runs"]] == [r["mlflow_run_id"] for r in result["runs"]]


def test_damaged_artifacts_are_named_refused_by_a_rerun_and_recomputed_bit_identically_on_resume(runs, capsys):
    """A deleted parquet, a truncated model.safetensors and one flipped bit in optimizer.pt."""
    from flows.rerun import rerun_stage
    from flows.train import train

    _, _, grpo = runs
    run = RunDir(grpo["run_dir"])
    digests = {p: json.loads(p.read_text())["digest"] for p in run.root.rglob(MANIFEST)}
    before = _mtimes(run)
    rewards = run.stage_dir(1, "reward") / "rewards.parquet"
    rewards.unlink()
    weights = run.stage_dir(0, "update") / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    optimizer = run.stage_dir(1, "update") / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0x10
    optimizer.write_bytes(bytes(data))

    with pytest.raises(StageNotReady, match=f"{rewards} is missing .*aepo run --run-dir"):
        rerun_stage(grpo["run_dir"], 1, "update")
    capsys.readouterr()
    train(run_dir=grpo["run_dir"])
    out = capsys.readouterr().out
    for path, what in ((weights, "differs from the digest"), (rewards, "is missing"), (optimizer, "differs from the digest")):
        assert f"{path} {what}" in out, out
    assert "recomputing update of iteration 0" in out and "recomputing reward of iteration 1" in out
    # recomputed bit-identically: every digest as before, and only the damaged stages were rewritten
    assert {p: json.loads(p.read_text())["digest"] for p in run.root.rglob(MANIFEST)} == digests
    rewritten = {k for k, v in _mtimes(run).items() if before[k] != v}
    assert rewritten == {"iter_0000/update/_SUCCESS.json", "iter_0001/reward/_SUCCESS.json", "iter_0001/update/_SUCCESS.json"}


def test_a_full_disk_during_the_update_save_is_one_line_and_resume_is_bit_identical(runs, monkeypatch):
    import errno
    import shutil

    from aepo_core import atomic
    from aepo_core.atomic import DiskFull
    from aepo_core.pipeline import stages

    _, _, grpo = runs
    run = RunDir(grpo["run_dir"])
    digest = run.digest(1, "update")
    shutil.rmtree(run.stage_dir(1, "update"))  # as if the killed save had never happened
    real_save = stages.torch.save

    def full_disk_save(obj, path, **kwargs):  # torch's own words when the disk fills mid-write
        real_save(obj, path, **kwargs)
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
        raise RuntimeError(f"[enforce fail at inline_container.cc:672] . unexpected pos {size // 2} vs {size}")

    monkeypatch.setattr(stages.torch, "save", full_disk_save)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096, "total": 1, "used": 1})())
    with pytest.raises(DiskFull) as info:
        stages.update(run, 1)
    message = str(info.value)
    assert message.startswith(f"no space left on device writing {run.stage_dir(1, 'update')}: needs about ")
    assert " MiB, 4.0 KiB free on its file system" in message and "\n" not in message
    assert not run.stage_dir(1, "update").exists() and not list(run.root.rglob(".*.tmp-*"))

    monkeypatch.setattr(stages.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFull, match=f"writing {run.stage_dir(1, 'update')}"):
        stages.update(run, 1)
    monkeypatch.undo()  # space freed: the same stage again gives the same bytes
    stages.update(run, 1)
    assert run.digest(1, "update") == digest
