"""Data-parallel rollout: D processes, one engine each, acting as one engine.

The rollout and evaluation stages run as the same program on D torchrun ranks
(``rollout.data_parallel``; aepo_core.pipeline.distributed). Every rank builds the same requests
(they are computed from the same files), so :meth:`DataParallelEngine.generate` needs no scatter:
each rank samples its contiguous shard of the requests with its own engine (its own GPU, or its
CPU process) and the shards' completions are gathered on every rank and concatenated in rank
order, which is request order. Every rank then holds the whole call's completions and carries on
with the stage identically (verifying, choosing the next regulariser prompts); rank 0 writes.

Why the table does not depend on D: a request with a seed has its own random stream, and an
unseeded one draws the stream of its position in the whole call (``first_index``), so a row's
tokens never depend on which rank sampled it or what else that rank sampled (HF engine; vLLM on
GPUs with per-request seeds). tests/test_data_parallel.py checks D = 1 against D = 2.
"""

from __future__ import annotations

from pathlib import Path

from aepo_core.core.ranks import Ranks, gather
from aepo_core.core.update import split_in_order
from aepo_core.io.engines.base import Completion, RolloutEngine, SamplingRequest


def request_shards(num_requests: int, world: int) -> list[range]:
    """The requests each of `world` engines samples: contiguous, in order, sizes differing by at most
    one (``split_in_order``), padded with empty ranges to exactly `world` (fewer requests than
    engines). E.g. request_shards(5, 7) -> [0:1], [1:2], [2:3], [3:4], [4:5], [5:5], [5:5]."""
    shards = split_in_order(num_requests, world)
    return shards + [range(num_requests, num_requests)] * (world - len(shards))


class DataParallelEngine:
    """One rank's view of D engines that sample one call together (a :class:`RolloutEngine`).

    Every rank must call :meth:`generate` with the same requests, the same number of times (it is a
    collective: the completions are all-gathered over the default process group).
    """

    def __init__(self, engine: RolloutEngine, ranks: Ranks):
        self.engine, self.ranks = engine, ranks
        self.tokenizer = engine.tokenizer

    @property
    def show_progress(self) -> bool:
        return self.engine.show_progress

    @show_progress.setter
    def show_progress(self, value: bool) -> None:
        self.engine.show_progress = value and self.ranks.rank == 0  # one bar, rank 0's share

    def generate(self, requests: list[SamplingRequest], seed: int, first_index: int = 0) -> list[Completion]:
        """The whole call's completions, on every rank: this rank samples requests
        ``request_shards(len(requests), D)[rank]`` and the shards are gathered in rank order."""
        shard = request_shards(len(requests), self.ranks.world)[self.ranks.rank]
        mine = self.engine.generate(requests[shard.start : shard.stop], seed, first_index=first_index + shard.start) \
            if len(shard) else []
        return [c for part in gather(mine, self.ranks) for c in part]

    def load_weights(self, folder: str | Path) -> None:
        self.engine.load_weights(folder)

    def close(self) -> None:
        self.engine.close()
