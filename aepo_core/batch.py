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
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

ROLE_POLICY = "policy"
ROLE_REINFORCE = "reinforce"


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
        pad_id:         the id used for padding (also when concat has to widen a batch).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    rewards: Tensor
    temperatures: Tensor
    roles: list[str] = field(default_factory=list)
    source_index: Tensor | None = None
    weights: Tensor | None = None
    advantages: Tensor | None = None
    pad_id: int = 0

    def __post_init__(self) -> None:
        b, length = self.input_ids.shape
        if not self.roles:
            self.roles = [ROLE_POLICY] * b
        if self.source_index is None:
            self.source_index = torch.arange(b, device=self.input_ids.device)
        if self.weights is None:
            self.weights = torch.ones(b, dtype=torch.float32, device=self.input_ids.device)
        for name in ("attention_mask", "response_mask"):
            if getattr(self, name).shape != (b, length):
                raise ValueError(
                    f"{name} has shape {tuple(getattr(self, name).shape)}, expected {(b, length)}"
                )
        if self.advantages is not None and self.advantages.shape != (b, length):
            raise ValueError(f"advantages has shape {tuple(self.advantages.shape)}, expected {(b, length)}")
        for name in ("rewards", "temperatures", "source_index", "weights"):
            if getattr(self, name).shape != (b,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {(b,)}")
        if len(self.roles) != b:
            raise ValueError(f"roles has {len(self.roles)} entries, expected {b}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_token_lists(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        pad_id: int,
        rewards: Sequence[float] | Tensor | None = None,
        temperatures: Sequence[float] | Tensor | float = 1.0,
    ) -> SequenceBatch:
        """Right-pad ``prompt + response`` rows into a batch.

        Args:
            prompt_ids: B lists of prompt token ids (each non-empty: the first response token is
                predicted from the last prompt position).
            response_ids: B lists of response token ids (may be empty: the row then has no labels).
            pad_id: padding token id.
            rewards: B rewards (default zeros).
            temperatures: B sampling temperatures, or one for all rows.
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
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
            if len(p) == 0:
                raise ValueError(f"row {i}: empty prompt (the first response token needs a context)")
            n = len(p) + len(r)
            input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
            attention_mask[i, :n] = 1
            response_mask[i, len(p) : n] = 1.0
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

    def select(self, rows: Sequence[int] | Tensor) -> SequenceBatch:
        """The rows ``rows`` (in that order) with every field kept aligned; [B, L] -> [len(rows), L]."""
        idx = torch.as_tensor(list(rows) if not isinstance(rows, Tensor) else rows, dtype=torch.long)
        idx_dev = idx.to(self.input_ids.device)
        idx_list = idx.tolist()
        return SequenceBatch(
            input_ids=self.input_ids[idx_dev],
            attention_mask=self.attention_mask[idx_dev],
            response_mask=self.response_mask[idx_dev],
            rewards=self.rewards[idx_dev],
            temperatures=self.temperatures[idx_dev],
            roles=[self.roles[i] for i in idx_list],
            source_index=self.source_index[idx_dev],
            weights=self.weights[idx_dev],
            advantages=None if self.advantages is None else self.advantages[idx_dev],
            pad_id=self.pad_id,
        )

    def with_fields(self, **changes) -> SequenceBatch:
        """A shallow copy with some fields replaced (re-validated)."""
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> SequenceBatch:
        """The same batch with every tensor on ``device``."""
        return SequenceBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            response_mask=self.response_mask.to(device),
            rewards=self.rewards.to(device),
            temperatures=self.temperatures.to(device),
            roles=list(self.roles),
            source_index=self.source_index.to(device),
            weights=self.weights.to(device),
            advantages=None if self.advantages is None else self.advantages.to(device),
            pad_id=self.pad_id,
        )

    def trimmed(self) -> SequenceBatch:
        """Drop trailing columns that are padding in every row ([B, L] -> [B, L'] with L' <= L).

        With right padding and a causal model, the logits of real tokens do not depend on later pad
        columns, so trimming saves compute without changing any log-prob the loss uses.
        """
        used = self.attention_mask.sum(dim=1)
        new_len = int(used.max().item()) if len(self) else 0
        if new_len == self.seq_len:
            return self
        return SequenceBatch(
            input_ids=self.input_ids[:, :new_len],
            attention_mask=self.attention_mask[:, :new_len],
            response_mask=self.response_mask[:, :new_len],
            rewards=self.rewards,
            temperatures=self.temperatures,
            roles=list(self.roles),
            source_index=self.source_index,
            weights=self.weights,
            advantages=None if self.advantages is None else self.advantages[:, :new_len],
            pad_id=self.pad_id,
        )

    @staticmethod
    def concat(batches: Sequence[SequenceBatch]) -> SequenceBatch:
        """Stack batches row-wise, right-padding narrower ones to the widest length.

        [B1, L1], [B2, L2], ... -> [B1 + B2 + ..., max(L)]. Either all batches carry advantages or
        none does. The first batch's pad_id is used for new padding columns.
        """
        batches = [b for b in batches]
        if not batches:
            raise ValueError("concat needs at least one batch")
        has_adv = [b.advantages is not None for b in batches]
        if any(has_adv) and not all(has_adv):
            raise ValueError("concat: either every batch has advantages or none does")
        pad_id = batches[0].pad_id
        length = max(b.seq_len for b in batches)

        def widen(t: Tensor, value: float) -> Tensor:
            extra = length - t.shape[1]
            if extra == 0:
                return t
            return torch.nn.functional.pad(t, (0, extra), value=value)

        return SequenceBatch(
            input_ids=torch.cat([widen(b.input_ids, pad_id) for b in batches]),
            attention_mask=torch.cat([widen(b.attention_mask, 0) for b in batches]),
            response_mask=torch.cat([widen(b.response_mask, 0.0) for b in batches]),
            rewards=torch.cat([b.rewards for b in batches]),
            temperatures=torch.cat([b.temperatures for b in batches]),
            roles=[r for b in batches for r in b.roles],
            source_index=torch.cat([b.source_index for b in batches]),
            weights=torch.cat([b.weights for b in batches]),
            advantages=torch.cat([widen(b.advantages, 0.0) for b in batches]) if all(has_adv) else None,
            pad_id=pad_id,
        )
