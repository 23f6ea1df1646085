"""End to end: the Prefect train flow on the real base policy, every artifact checked, MLflow checked,
and a resume after a real process kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_run import K, N, P

from aepo_core.core.advantages import group_advantages
from aepo_core.io.verifiers import SyntheticVerifier
from aepo_core.pipeline.rundir import MANIFEST, RunDir
from aepo_core.pipeline.stages import STAGES

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def trained_run(base_policy_dir, tmp_path_factory, prefect_harness, tiny_overrides):
    from flows.train import train

    root = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(base_policy_dir, root)
    result = train(overrides=overrides, iterations=3)
    return RunDir(result["run_dir"]), result, overrides


def test_every_stage_published_with_manifest(trained_run):
    run, _, _ = trained_run
    for i in range(3):
        for stage in STAGES:
            folder = run.stage_dir(i, stage)
            if stage == "evaluate" and i == 0:  # every=2: evaluated after iterations 1 and 2 (the last)
                assert not folder.exists()
                continue
            manifest = json.loads((folder / MANIFEST).read_text())
            assert manifest["stage"] == stage and manifest["iteration"] == i and manifest["seconds"] >= 0
            assert manifest["upstream"] and len(manifest["digest"]) == 64
    assert not list(run.root.rglob(".*.tmp-*"))  # no half-written leftovers


def test_rollouts_schema_and_batches(trained_run):
    run, _, _ = trained_run
    cfg = run.config()
    rollouts = pq.read_table(run.stage_dir(1, "rollout") / "rollouts.parquet").to_pylist()
    num_reg = math.ceil(0.5 * P)  # rollout.regulariser_sampling "all": every regulariser prompt
    assert run.manifest(1, "rollout")["metrics"]["regulariser_prompts"] == num_reg
    assert len(rollouts) == P * N + num_reg * N
    assert [r["row_id"] for r in rollouts] == list(range(len(rollouts)))
    policy = [r for r in rollouts if r["batch"] == "policy"]
    reg = [r for r in rollouts if r["batch"] == "regulariser"]
    assert len(policy) == P * N and {r["temperature"] for r in policy} == {1.0}
    controller = json.loads((run.stage_dir(0, "entropy") / "controller.json").read_text())
    assert {round(r["temperature"], 4) for r in reg} == {round(controller["next_temperature"], 4)}
    assert {r["prompt_index"] for r in reg} == set(range(num_reg))
    for r in rollouts:
        assert len(r["token_ids"]) == len(r["logprobs"]) > 0
        assert r["finish_reason"] in ("stop", "length")
    prompts = pq.read_table(run.stage_dir(1, "prepare") / "prompts.parquet")
    assert prompts.num_rows == P and cfg.rollout.n == N


def test_in_order_regulariser_sampling_trains_what_sampling_them_all_would(trained_run, tmp_path):
    """Iteration 0 again with rollout.regulariser_sampling=in_order, same seeds, against the run's
    own (all: every regulariser prompt in one engine call, the reference): the in-order rollout
    sampled a prefix of those rows, and the update trained the same rows into the same policy, bit
    for bit."""
    from aepo_core.config import load_config
    from aepo_core.pipeline import stages

    run, _, overrides = trained_run
    cfg = load_config(None, overrides + ["run.iterations=3", "rollout.regulariser_sampling=in_order"])
    in_order = stages.init_run(cfg, tmp_path / "in-order", log=lambda *a: None)
    try:
        for stage in ("prepare", "rollout", "reward", "update"):
            stages.PIPELINE[stage].run(in_order, 0)
    finally:
        in_order.release_writer()
    ours = pq.read_table(in_order.stage_dir(0, "rollout") / "rollouts.parquet").to_pylist()
    every = pq.read_table(run.stage_dir(0, "rollout") / "rollouts.parquet").to_pylist()
    assert run.manifest(0, "rollout")["metrics"]["regulariser_prompts"] == math.ceil(0.5 * P)
    assert in_order.manifest(0, "rollout")["metrics"]["regulariser_prompts"] >= math.ceil(K / N)
    assert len(ours) <= len(every)
    key = ("row_id", "prompt_index", "sample", "batch", "token_ids")
    assert [[r[k] for k in key] for r in ours] == [[r[k] for k in key] for r in every[: len(ours)]]
    # the log-probs agree to float32 rounding: the engine's batch differs in size, so do its kernels
    for a, b in zip(ours, every, strict=False):
        assert np.allclose(a["logprobs"], b["logprobs"], atol=1e-4), a["row_id"]
    assert pq.read_table(run.stage_dir(0, "update") / "update_batch.parquet").equals(
        pq.read_table(in_order.stage_dir(0, "update") / "update_batch.parquet"))
    weights = "policy/model.safetensors"
    assert run.manifest(0, "update")["files"][weights] == in_order.manifest(0, "update")["files"][weights]


def test_rewards_agree_with_reverifying_the_texts(trained_run):
    run, _, _ = trained_run
    for i in range(3):
        prompts = pq.read_table(run.stage_dir(i, "prepare") / "prompts.parquet").to_pylist()
        rollouts = pq.read_table(run.stage_dir(i, "rollout") / "rollouts.parquet").to_pylist()
        rewards = pq.read_table(run.stage_dir(i, "reward") / "rewards.parquet").to_pylist()
        for ro, rw in zip(rollouts, rewards, strict=True):
            judged = SyntheticVerifier().judge(ro["text"], prompts[ro["prompt_index"]]["answer"])
            assert (rw["row_id"], rw["reward"], rw["verdict"]) == (ro["row_id"], judged.reward, judged.verdict)


def _group_advantages_by_row(rollouts, rewards, batch):
    rows = sorted((r for r in rollouts if r["batch"] == batch), key=lambda r: (r["prompt_index"], r["sample"]))
    reward_of = {r["row_id"]: r["reward"] for r in rewards}
    adv = group_advantages(torch.tensor([reward_of[r["row_id"]] for r in rows]), N)
    return {r["row_id"]: float(a) for r, a in zip(rows, adv, strict=True)}


def test_update_batch_follows_the_aepo_rules(trained_run):
    run, _, _ = trained_run
    h_prev = 0.0  # before the first update
    target = run.config().algorithm.target_entropy
    for i in range(3):
        rollouts = pq.read_table(run.stage_dir(i, "rollout") / "rollouts.parquet").to_pylist()
        rewards = pq.read_table(run.stage_dir(i, "reward") / "rewards.parquet").to_pylist()
        used = pq.read_table(run.stage_dir(i, "update") / "update_batch.parquet").to_pylist()
        assert len(used) == P * N  # replace mode keeps the batch size

        policy_adv = _group_advantages_by_row(rollouts, rewards, "policy")
        for rec in used:
            if rec["role"] == "policy":
                assert rec["advantage"] == pytest.approx(policy_adv[rec["rollout_row_id"]], abs=1e-5)
        # the REINFORCE rows are exactly the first k positives of the tempered batch, advantage +1
        reg_adv = _group_advantages_by_row(rollouts, rewards, "regulariser")
        positives = [row for row, a in reg_adv.items() if a > 0.05]
        k = min(K, len(positives)) // (2 if h_prev > target else 1)
        reinforce = [rec for rec in used if rec["role"] == "reinforce"]
        assert [rec["rollout_row_id"] for rec in reinforce] == positives[:k]
        assert all(rec["advantage"] == pytest.approx(1.0) for rec in reinforce)
        assert [rec["role"] for rec in used[:k]] == ["reinforce"] * k  # first, in the on-policy mini-batch
        # the first k policy rows (in group order) were the ones dropped
        kept_policy = [rec["rollout_row_id"] for rec in used if rec["role"] == "policy"]
        assert kept_policy == list(policy_adv)[k:]

        manifest = run.manifest(i, "update")["metrics"]
        assert manifest["aepo/k"] == k and manifest["aepo/num_positives"] == len(positives)
        controller = json.loads((run.stage_dir(i, "entropy") / "controller.json").read_text())
        h_prev = controller["state"]["h_prev"]
        assert h_prev == pytest.approx(manifest["entropy/nll_policy_rows"])  # entropy_rows "policy"
        assert controller["measured"]["rows"] == "policy" and controller["measured"]["read"] == "entropy/nll_policy_rows"
        want_t = 1.2 if h_prev <= target else 0.8
        assert controller["next_temperature"] == want_t


def test_policy_checkpoints_are_loadable_and_change(trained_run):
    from transformers import AutoModelForCausalLM

    run, _, _ = trained_run
    base = AutoModelForCausalLM.from_pretrained(json.loads((run.root / "base.json").read_text())["path"])
    last = AutoModelForCausalLM.from_pretrained(run.stage_dir(2, "update") / "policy")
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(base.parameters(), last.parameters(), strict=True)]
    assert max(diffs) > 0
    assert (run.stage_dir(2, "update") / "optimizer.pt").is_file()


def test_evaluation_metrics(trained_run):
    run, _, _ = trained_run
    metrics = run.manifest(2, "evaluate")["metrics"]
    records = pq.read_table(run.stage_dir(2, "evaluate") / "eval.parquet")
    assert records.num_rows == 12 * 2
    assert metrics["accuracy"] == pytest.approx(np.mean(records.column("reward").to_numpy()))
    assert metrics["n"] == 2 and metrics["temperature"] == 1.0
    # per-source breakdown: the synthetic source is the number of terms
    sources = records.column("source").to_pylist()
    rewards = records.column("reward").to_numpy()
    assert len(set(sources)) > 1
    for source in set(sources):
        mine = [r for r, s in zip(rewards, sources, strict=True) if s == source]
        assert metrics[f"{source}/accuracy"] == pytest.approx(np.mean(mine))
        assert metrics[f"{source}/num_prompts"] == len(mine) / 2


def test_mlflow_has_one_point_per_iteration(trained_run):
    from mlflow.tracking import MlflowClient

    run, result, _ = trained_run
    client = MlflowClient(result["tracking_uri"])
    mlrun = client.get_run(result["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["algorithm"] == "aepo" and mlrun.data.tags["target_entropy"] == "0.3"
    assert mlrun.data.params["algorithm.target_entropy"] == "0.3"
    for key in ("reward/reward_mean", "entropy/nll", "entropy/exact", "aepo/k", "rollout/tokens_per_s", "time/update_s", "actor/grad_norm"):
        steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], key)]
        assert steps == [0, 1, 2], key
    # times, one name each: the whole stage, and its compute part (no duplicate under another name)
    metrics = mlrun.data.metrics
    assert {"time/update_s", "time/update_step_s", "time/rollout_generate_s", "time/reward_verify_s"} <= set(metrics)
    assert not [key for key in metrics if key.endswith("_seconds")]
    assert metrics["time/update_step_s"] < metrics["time/update_s"]
    # the HF engine's log-probs against the trainer's recomputation, on the policy rows (same model,
    # same weights: small, not zero -- the engine samples with a KV cache, the trainer in one pass)
    assert 0.0 <= metrics["mismatch/mean_abs_logp"] <= metrics["mismatch/max_abs_logp"] < 0.5
    assert metrics["mismatch/k3"] >= 0.0 and metrics["mismatch/corrected_fraction"] == 0.0
    evals = client.get_metric_history(result["mlflow_run_id"], "eval/accuracy")
    assert sorted(m.step for m in evals) == [-1, 1, 2]  # -1: the base policy, evaluated before the first update
    base = run.manifest(-1, "evaluate")
    assert (run.root / "base" / "evaluate" / "eval.parquet").is_file()
    assert base["upstream"]["update"] == run.read_json("base.json")["digest"]  # it read the starting policy
    assert [m.value for m in evals if m.step == -1] == [pytest.approx(base["metrics"]["accuracy"])]
    reward1 = [m.value for m in client.get_metric_history(result["mlflow_run_id"], "reward/reward_mean") if m.step == 1]
    assert reward1 == [pytest.approx(run.manifest(1, "reward")["metrics"]["reward_mean"])]
    assert (run.root.parent / "mlflow.db").is_file()


def test_second_run_skips_everything_and_logs_nothing_twice(trained_run):
    from mlflow.tracking import MlflowClient

    from flows.train import train

    run, result, overrides = trained_run
    before = {p: p.stat().st_mtime_ns for p in run.root.rglob(MANIFEST)}
    again = train(overrides=overrides, iterations=3)
    assert again["mlflow_run_id"] == result["mlflow_run_id"]
    assert {p: p.stat().st_mtime_ns for p in run.root.rglob(MANIFEST)} == before
    history = MlflowClient(result["tracking_uri"]).get_metric_history(result["mlflow_run_id"], "reward/reward_mean")
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_resume_after_a_real_kill(base_policy_dir, tmp_path, tiny_overrides):
    """Start `aepo run` in a subprocess, SIGKILL it in the middle of iteration 1, run it again."""
    root = tmp_path / "runs"
    run_dir = tmp_path / "runs" / "killed"
    cmd = [sys.executable, "-m", "aepo_core.cli", "run", "--run-dir", str(run_dir), "--iterations", "3", "--no-progress"]
    cmd += tiny_overrides(base_policy_dir, root)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)  # as a user would: no server, Prefect starts a temporary one
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run = RunDir(run_dir)
    deadline = time.time() + 3600  # a guard against a hang, not a speed check: a busy machine is slow
    try:
        while time.time() < deadline and proc.poll() is None:
            if run.manifest(1, "rollout") is not None:  # iteration 1 is under way: kill it now
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert run.manifest(2, "update") is None
    done_before = {p: p.stat().st_mtime_ns for p in (run_dir / "iter_0000").rglob(MANIFEST)}
    assert len(done_before) == 5  # iteration 0 finished (no evaluation due)

    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)  # hang guard
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "iter 0000" in finished.stdout and "done before: prepare, rollout, reward, update, entropy" in finished.stdout
    # the end of the run says the result, where the checkpoint and the plots are, and the run's size
    out = finished.stdout
    assert "iter 0001/0003 |" in out and ", ETA " in out
    assert "finished 3 iterations in " in out and "held-out at iteration 2: accuracy (avg@2) " in out
    assert "entropy (entropy/nll_policy_rows): " in out and "(target 0.3)" in out
    assert f"final checkpoint: {run_dir / 'iter_0002' / 'update' / 'policy'}" in out and "on disk)" in out
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "iter_0000").rglob(MANIFEST)} == done_before
    for stage in STAGES:
        assert run.manifest(2, stage) is not None, stage
    assert not list(run_dir.rglob(".*.tmp-*"))
    # the MLflow run was continued, with one point per iteration
    from mlflow.tracking import MlflowClient

    rec = json.loads((run_dir / "mlflow.json").read_text())
    history = MlflowClient(rec["tracking_uri"]).get_metric_history(rec["run_id"], "entropy/nll")
    assert sorted(m.step for m in history) == [0, 1, 2]
