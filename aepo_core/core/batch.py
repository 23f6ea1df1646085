"""A batch of prompt+response sequences with the per-row data the update needs, kept row-aligned.

Layout (right padding): row b is ``prompt_b + response_b + pad...``. Every per-token tensor is
``[B, L]`` and aligned with ``input_ids``: position t holds the quantity *for token t* (its log-prob
under the policy comes from the logits at position t - 1). ``response_mask[b, t] == 1`` exactly when
token t of row b is a response token, i.e. a label the loss is taken over.

Per-row data (``rewards``, ``temperatures``, ``roles``, ``source_index``, ``weights``) and the optional
token-level ``advantages`` travel together: :meth:`SequenceBatch.select` and
:meth:`SequenceBatch.concat` never separate a row's fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cache
from typing import Any, NamedTuple

import torch
from torch import Tensor

ROLE_POLICY = "policy"
ROLE_REINFORCE = "reinforce"

# How a field travels through the row operations; every field of SequenceBatch (and of a subclass)
# declares one in its metadata, and the operations are derived from these declarations.
TOKEN = "token"  # [B, L] tensor aligned with input_ids: rows indexed, columns trimmed and widened
ROW = "row"  # [B] tensor: rows indexed and concatenated
ROW_LIST = "row_list"  # python list of B entries: rows indexed and concatenated
SCALAR = "scalar"  # one value for the whole batch: copied (concat keeps the first batch's)
PAD_WITH_PAD_ID = "pad_id"  # a token field widened with the batch's pad_id instead of a constant


def token_field(pad: float | str = 0, optional: bool = False, **kw: Any):
    """A [B, L] field. ``pad``: the value new columns get in :meth:`SequenceBatch.concat` (or
    :data:`PAD_WITH_PAD_ID`); ``optional``: the field may be None (then it is None in every result)."""
    return field(metadata={"kind": TOKEN, "pad": pad, "optional": optional}, **kw)


def row_field(optional: bool = False, **kw: Any):
    """A [B] tensor field (see :func:`token_field` for ``optional``)."""
    return field(metadata={"kind": ROW, "optional": optional}, **kw)


def row_list_field(**kw: Any):
    """A per-row python list field of B entries."""
    return field(metadata={"kind": ROW_LIST}, **kw)


def scalar_field(**kw: Any):
    """A batch-wide value, not indexed by row."""
    return field(metadata={"kind": SCALAR}, **kw)


class _Field(NamedTuple):
    name: str
    kind: str
    pad: float | str
    optional: bool


@cache
def batch_fields(cls: type) -> tuple[_Field, ...]:
    """Every dataclass field of ``cls`` with its kind, read once per class from the declarations."""
    out = []
    for f in fields(cls):
        kind = f.metadata.get("kind")
        if kind not in (TOKEN, ROW, ROW_LIST, SCALAR):
            raise TypeError(
                f"{cls.__name__}.{f.name} declares no row kind: define it with token_field, row_field, "
                "row_list_field or scalar_field so the row operations carry it"
            )
        out.append(_Field(f.name, kind, f.metadata.get("pad", 0), bool(f.metadata.get("optional", False))))
    return tuple(out)


@dataclass
class SequenceBatch:
    """Row-aligned batch of B sequences of length L.

    Fields:
        input_ids:      [B, L] long, prompt + response + pad.
        attention_mask: [B, L] long, 1 on prompt and response tokens, 0 on padding.
        response_mask:  [B, L] float, 1 where token t is a response token (a label).
        rewards:        [B] float, the verifiable reward of each response.
        temperatures:   [B] float, the temperature each response was sampled at.
        roles:          B strings, "policy" (GRPO row) or "reinforce" (AEPO regulariser row).
        source_index:   [B] long, the row's index in the batch it was taken from (a policy or a
                        regulariser batch), so per-row records can point back to the rollout.
        weights:        [B] float, multiplier on the row's loss term (alpha for "add" rows, else 1).
        advantages:     [B, L] float or None, the advantage used for each response token.
        rollout_logprobs: [B, L] float or None, the rollout engine's log-prob of each response
                        token (at its sampling temperature, after the engine's processing), for
                        the rollout-trainer mismatch (aepo_core.core.losses.rollout_mismatch).
        pad_id:         the id used for padding (also when concat has to widen a batch).

    Each field declares its kind (token_field, row_field, ...); select, to, trimmed and concat are
    written once over those kinds, so a new field (here or in a subclass) travels with its rows.
    """

    input_ids: Tensor = token_field(pad=PAD_WITH_PAD_ID)
    attention_mask: Tensor = token_field(pad=0)
    response_mask: Tensor = token_field(pad=0.0)
    rewards: Tensor = row_field()
    temperatures: Tensor = row_field()
    roles: list[str] = row_list_field(default_factory=list)
    source_index: Tensor | None = row_field(default=None)
    weights: Tensor | None = row_field(default=None)
    advantages: Tensor | None = token_field(pad=0.0, optional=True, default=None)
    rollout_logprobs: Tensor | None = token_field(pad=0.0, optional=True, default=None)
    pad_id: int = scalar_field(default=0)

    def __post_init__(self) -> None:
        b, length = self.input_ids.shape
        if not self.roles:
            self.roles = [ROLE_POLICY] * b
        if self.source_index is None:
            self.source_index = torch.arange(b, device=self.input_ids.device)
        if self.weights is None:
            self.weights = torch.ones(b, dtype=torch.float32, device=self.input_ids.device)
        for f in batch_fields(type(self)):
            value = getattr(self, f.name)
            if f.kind == SCALAR or (value is None and f.optional):
                continue
            if f.kind == ROW_LIST:
                if len(value) != b:
                    raise ValueError(f"{f.name} has {len(value)} entries, expected {b}")
                continue
            expected = (b, length) if f.kind == TOKEN else (b,)
            if value is None or value.shape != expected:
                got = None if value is None else tuple(value.shape)
                raise ValueError(f"{f.name} has shape {got}, expected {expected}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_token_lists(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        pad_id: int,
        rewards: Sequence[float] | Tensor | None = None,
        temperatures: Sequence[float] | Tensor | float = 1.0,
        response_logprobs: Sequence[Sequence[float]] | None = None,
    ) -> SequenceBatch:
        """Right-pad ``prompt + response`` rows into a batch.

        Args:
            prompt_ids: B lists of prompt token ids (each non-empty: the first response token is
                predicted from the last prompt position).
            response_ids: B lists of response token ids (may be empty: the row then has no labels).
            pad_id: padding token id.
            rewards: B rewards (default zeros).
            temperatures: B sampling temperatures, or one for all rows.
            response_logprobs: B lists, the engine's log-prob of each response token (as long as
                the response), placed at the response's positions; None: no rollout_logprobs.
        Returns:
            SequenceBatch with input_ids/attention_mask/response_mask of shape [B, max(len(p)+len(r))].
        """
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        b = len(prompt_ids)
        length = max((len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)), default=0)
        input_ids = torch.full((b, length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        response_mask = torch.zeros((b, length), dtype=torch.float32)
        rollout_logprobs = None if response_logprobs is None else torch.zeros((b, length), dtype=torch.float32)
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            if len(p) == 0:
                raise ValueError(f"row {i}: empty prompt (the first response token needs a context)")
            n = len(p) + len(r)
            input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
            attention_mask[i, :n] = 1
            response_mask[i, len(p) : n] = 1.0
            if rollout_logprobs is not None:
                if len(response_logprobs[i]) != len(r):
                    raise ValueError(f"row {i}: {len(response_logprobs[i])} log-probs for {len(r)} response tokens")
                rollout_logprobs[i, len(p) : n] = torch.tensor(list(response_logprobs[i]), dtype=torch.float32)
        rewards_t = torch.zeros(b) if rewards is None else torch.as_tensor(rewards, dtype=torch.float32)
        if isinstance(temperatures, (int, float)):
            temps_t = torch.full((b,), float(temperatures))
        else:
            temps_t = torch.as_tensor(temperatures, dtype=torch.float32)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            rewards=rewards_t.float(),
            temperatures=temps_t.float(),
            rollout_logprobs=rollout_logprobs,
            pad_id=pad_id,
        )

    # ------------------------------------------------------------------ row operations
    def __len__(self) -> int:
        """B, the number of rows."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """L, the padded sequence length."""
        return int(self.input_ids.shape[1])

    def _map_rows(self, token, row, row_list) -> SequenceBatch:
        """A batch of the same class, each non-None field passed through the function for its kind."""
        changes = {}
        for f in batch_fields(type(self)):
            value = getattr(self, f.name)
            if f.kind == SCALAR or value is None:
                changes[f.name] = value
            else:
                changes[f.name] = {TOKEN: token, ROW: row, ROW_LIST: row_list}[f.kind](value)
        return type(self)(**changes)

    def select(self, rows: Sequence[int] | Tensor) -> SequenceBatch:
        """The rows ``rows`` (in that order) with every field kept aligned; [B, L] -> [len(rows), L]."""
        idx = torch.as_tensor(list(rows) if not isinstance(rows, Tensor) else rows, dtype=torch.long)
        idx_dev = idx.to(self.input_ids.device)
        idx_list = idx.tolist()
        return self._map_rows(
            token=lambda t: t[idx_dev],
            row=lambda t: t[idx_dev],
            row_list=lambda xs: [xs[i] for i in idx_list],
        )

    def with_fields(self, **changes) -> SequenceBatch:
        """A shallow copy with some fields replaced (re-validated)."""
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> SequenceBatch:
        """The same batch with every tensor on ``device``."""
        return self._map_rows(token=lambda t: t.to(device), row=lambda t: t.to(device), row_list=list)

    def trimmed(self) -> SequenceBatch:
        """Drop trailing columns that are padding in every row ([B, L] -> [B, L'] with L' <= L).

        With right padding and a causal model, the logits of real tokens do not depend on later pad
        columns, so trimming saves compute without changing any log-prob the loss uses.
        """
        used = self.attention_mask.sum(dim=1)
        new_len = int(used.max().item()) if len(self) else 0
        if new_len == self.seq_len:
            return self
        return self._map_rows(token=lambda t: t[:, :new_len], row=lambda t: t, row_list=list)

    @staticmethod
    def concat(batches: Sequence[SequenceBatch]) -> SequenceBatch:
        """Stack batches row-wise, right-padding narrower ones to the widest length.

        [B1, L1], [B2, L2], ... -> [B1 + B2 + ..., max(L)]. Either all batches carry advantages (any
        optional field) or none does. The first batch's pad_id (scalars) is used, also for new
        padding columns; the result has the first batch's class.
        """
        batches = [b for b in batches]
        if not batches:
            raise ValueError("concat needs at least one batch")
        cls = type(batches[0])
        first = batches[0]
        length = max(b.seq_len for b in batches)

        def widen(t: Tensor, value: float) -> Tensor:
            extra = length - t.shape[1]
            if extra == 0:
                return t
            return torch.nn.functional.pad(t, (0, extra), value=value)

        changes = {}
        for f in batch_fields(cls):
            values = [getattr(b, f.name) for b in batches]
            if f.kind == SCALAR:
                changes[f.name] = values[0]
                continue
            present = [v is not None for v in values]
            if not all(present):
                if any(present):
                    raise ValueError(f"concat: either every batch has {f.name} or none does")
                changes[f.name] = None
            elif f.kind == TOKEN:
                pad = first.pad_id if f.pad == PAD_WITH_PAD_ID else f.pad
                changes[f.name] = torch.cat([widen(v, pad) for v in values])
            elif f.kind == ROW:
                changes[f.name] = torch.cat(values)
            else:
                changes[f.name] = [x for v in values for x in v]
        return cls(**changes)
