"""Data-parallel rollout (rollout.data_parallel): what the D engine processes rely on.

A rank samples a contiguous shard of the requests with ``first_index`` set to the shard's start; the
shards' completions concatenated must be the whole call's (the gather is a concatenation in rank
order). The end-to-end run on 2 processes is in tests/test_distributed_run.py."""

from __future__ import annotations

import numpy as np
import pytest

from aepo_core.core.ranks import Ranks
from aepo_core.core.update import split_in_order
from aepo_core.io.engines import SamplingRequest
from aepo_core.io.engines.data_parallel import DataParallelEngine, request_shards
from aepo_core.io.engines.hf import HFRolloutEngine


@pytest.fixture(scope="module")
def engine(tokenizer):
    from conftest import tiny_qwen

    return HFRolloutEngine(tiny_qwen(seed=3, tokenizer=tokenizer), tokenizer, batch_size=None)


def _requests(tokenizer, seeded: bool) -> list[SamplingRequest]:
    prompts = [tokenizer.encode(f"Add mod 10: {a} {b} {c}") for a, b, c in [(1, 2, 3), (4, 5, 6), (7, 8, 9), (2, 4, 6),
                                                                               (3, 5, 7)]]
    temps = [1.0, 1.2, 0.8, 1.0, 1.5]
    return [SamplingRequest(p, n=3, temperature=t, max_new_tokens=12, seed=(100 + i) if seeded else None)
            for i, (p, t) in enumerate(zip(prompts, temps, strict=True))]


@pytest.mark.parametrize("seeded", [True, False], ids=["request-seeds", "call-seed"])
@pytest.mark.parametrize("world", [2, 3, 7])
def test_shards_sampled_apart_are_the_whole_call(engine, tokenizer, seeded, world):
    requests = _requests(tokenizer, seeded)
    whole = engine.generate(requests, seed=11)
    parts = [engine.generate(requests[r.start : r.stop], seed=11, first_index=r.start)
             for r in split_in_order(len(requests), world)]
    joined = [c for part in parts for c in part]
    key = lambda c: (c.request_index, c.sample_index, c.temperature, c.token_ids, c.text, c.finish_reason)  # noqa: E731
    assert [key(c) for c in joined] == [key(c) for c in whole]
    for a, b in zip(joined, whole, strict=True):  # float32 rounding: the batch differs in size
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-4)
    # the call's seed matters to unseeded requests only; a shard without first_index is not the same
    # call (unseeded requests would draw the streams of positions 0.. again)
    if not seeded:
        tail = requests[2:]
        assert [c.token_ids for c in engine.generate(tail, seed=11)] != [c.token_ids for c in whole[6:]]


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_each_rank_samples_its_shard_and_the_gather_is_the_whole_call(engine, tokenizer, world, monkeypatch):
    """DataParallelEngine as rank r of `world` (5 requests: with 7 ranks, two sample nothing): what
    each rank hands to the all-gather, concatenated in rank order, is the whole call. The gather is
    replaced by one that records this rank's part (no process group in this process)."""
    import aepo_core.io.engines.data_parallel as dp_module

    requests = _requests(tokenizer, seeded=False)  # unseeded: a wrong first_index would change tokens
    handed: list[list] = []
    monkeypatch.setattr(dp_module, "gather", lambda mine, ranks: handed.append(mine) or [mine])
    for rank in range(world):
        DataParallelEngine(engine, Ranks(rank, world)).generate(requests, seed=5)
    whole = engine.generate(requests, seed=5)
    key = lambda c: (c.request_index, c.sample_index, c.token_ids)  # noqa: E731
    assert [key(c) for part in handed for c in part] == [key(c) for c in whole]
    assert sum(1 for part in handed if part) == min(world, len(requests))
    assert DataParallelEngine(engine, Ranks(0, world)).tokenizer is engine.tokenizer


def test_execution_only_key_changes_no_digest():
    from aepo_core.config import load_config
    from aepo_core.pipeline.stages import config_digest, stage_config_digest

    one, two = load_config(None, []), load_config(None, ["rollout.data_parallel=2"])
    assert config_digest(one) == config_digest(two)
    for stage in ("rollout", "evaluate", "update"):
        assert stage_config_digest(one, stage) == stage_config_digest(two, stage)


def test_request_shards_are_contiguous_in_order_and_one_per_engine():
    assert request_shards(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert request_shards(5, 7) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 5), range(5, 5)]
    assert request_shards(0, 2) == [range(0, 0), range(0, 0)]
