"""GRPO advantages: each response's reward compared with the other responses to the same prompt.

Groups are ``group_size`` consecutive rows (the n responses of one prompt, as the rollout emits
them). The scalar per-response advantage is broadcast to every response token by
:func:`broadcast_to_tokens`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageScaling = Literal["group", "batch", "none"]


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scaling: AdvantageScaling = "group",
    eps: float = 1e-6,
) -> Tensor:
    """Per-response GRPO advantage.

    Args:
        rewards: [B] rewards, B a multiple of group_size, groups of consecutive rows.
        group_size: n, responses per prompt.
        scaling: "group": (r - mean_g) / (std_g + eps) with the unbiased group std (GRPO);
            "batch": (r - mean_g) / (std_batch + eps), the unbiased std of all B rewards;
            "none": r - mean_g (Dr. GRPO, no std scaling).
        eps: added to the std so all-equal groups divide by eps, not 0.
    Returns:
        [B] float advantages. Rows of an all-equal group get exactly 0. A group of size 1 (whose
        unbiased std is undefined) also gets 0: the response has nothing to be compared with.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    b = rewards.shape[0]
    if b % group_size != 0:
        raise ValueError(f"{b} rewards do not split into groups of {group_size}")
    r = rewards.float().reshape(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scaling == "none":
        adv = centred
    elif scaling == "group":
        if group_size == 1:
            # unbiased std of one sample is nan; the centred reward is 0 anyway
            return torch.zeros_like(rewards, dtype=torch.float32)
        adv = centred / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
    elif scaling == "batch":
        std = rewards.float().std(unbiased=True) if b > 1 else torch.zeros((), device=rewards.device)
        adv = centred / (std + eps)
    else:
        raise ValueError(f"unknown advantage scaling {scaling!r}")
    return adv.reshape(-1)


def broadcast_to_tokens(row_values: Tensor, response_mask: Tensor) -> Tensor:
    """Spread one value per row over that row's response tokens.

    Args:
        row_values: [B] per-row value (an advantage).
        response_mask: [B, L] 1 on response tokens.
    Returns:
        [B, L] float: row_values[b] on the response tokens of row b, 0 elsewhere.
    """
    return row_values.float().unsqueeze(1) * response_mask.float()
