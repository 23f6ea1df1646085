"""The update step on several processes (ranks): which micro-batches each rank runs, and how what
the ranks measured becomes the single-process measurement.

Every rank holds the whole assembled batch (it read the same files and computed the same
advantages, positives and k), so the mini-batches, their micro-batches and the loss normalisers
(token and row counts of a whole mini-batch) are the same on every rank and need no reduction.
What a rank does alone is the forward/backward passes of its share of the micro-batches; the
gradients are summed over ranks (FSDP2's reduce-scatter with divide factor 1,
`aepo_core.io.sharded.shard_policy`), and the (sum, count) pairs each rank measured are gathered and
added (:func:`gather`). With one rank nothing here changes the single-process step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the update's processes: rank in 0..world-1."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's (rank, world size); (0, 1) without one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


SINGLE = Ranks()


def micro_batch_rows(mini_batch_rows: int, micro_batch_size: int | None, ranks: Ranks) -> int | None:
    """The row cap of a micro-batch: trainer.micro_batch_size, and with N ranks at most ceil(rows / N)
    so that a mini-batch has a micro-batch for every rank when it has the rows (a whole mini-batch
    in one micro-batch would leave N - 1 ranks idle). The gradient does not depend on the
    micro-batch partition (aepo_core.core.update, "Loss normaliser")."""
    if ranks.world == 1:
        return micro_batch_size
    share = math.ceil(mini_batch_rows / ranks.world)
    return share if micro_batch_size is None else min(micro_batch_size, share)


def deal(micro: list[Sequence[int]], has_tokens: Sequence[bool], ranks: Ranks) -> list[tuple[Sequence[int], bool]]:
    """This rank's passes over one mini-batch: [(rows, counts)], the same number on every rank.

    Args:
        micro: the mini-batch's micro-batches (row index sequences), the same list on every rank.
        has_tokens: [len(micro)] whether each micro-batch has a response token (one without has no
            gradient and measures nothing: the single process skips it, and so does every rank).
        ranks: this process's rank and the world size.
    Returns:
        One rank: the micro-batches with tokens, in order, each counting (counts True). N ranks: the
        i-th micro-batch with tokens goes to rank i mod N; a rank with fewer than the most any rank
        has gets padding passes (counts False) over the mini-batch's first row, which run a forward
        and a zero-weight backward pass: FSDP2 gathers and reduces the weights in every pass, and a
        rank that ran fewer passes than the others would wait for them until the process group's
        timeout. No micro-batch with tokens is ever left out.
    """
    real = [rows for rows, tokens in zip(micro, has_tokens, strict=True) if tokens]
    if ranks.world == 1:
        return [(rows, True) for rows in real]
    mine = [(rows, True) for rows in real[ranks.rank :: ranks.world]]
    passes = math.ceil(len(real) / ranks.world)
    return mine + [(real[0][:1], False)] * (passes - len(mine))


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value` (a picklable object), in rank order, on every rank; [value] with one rank.
    For the step's measurements: a few dicts of floats once per step, not worth a tensor protocol."""
    if ranks.world == 1:
        return [value]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out
