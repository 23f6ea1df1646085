"""The PPO-clipped policy loss, its aggregation over tokens, and the k3 KL estimator.

All per-token tensors are [B, L] and aligned with the batch's input_ids; ``mask`` is 1 on the
tokens that count (response tokens) and 0 on prompt and padding.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

LossAgg = Literal["token_mean", "seq_mean_token_mean", "constant"]

# log-ratios beyond this are numerically meaningless and would overflow exp(); verl clamps alike
_LOG_RATIO_CLAMP = 20.0


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [B, L] over the positions where ``mask`` [B, L] is 1; 0 when mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def loss_sum(values: Tensor, mask: Tensor, mode: LossAgg = "token_mean") -> Tensor:
    """The numerator of :func:`aggregate`: what one micro-batch adds to its mini-batch's loss.

    Args:
        values: [B, L] per-token values.
        mask: [B, L] 1 on the tokens that count.
        mode: "token_mean" and "constant": sum(v * m); "seq_mean_token_mean": the sum over rows (with
            at least one token) of each row's token mean.
    Returns:
        scalar tensor; summed over a partition of the rows it is the value for all of them.
    """
    mask = mask.to(values.dtype)
    if mode in ("token_mean", "constant"):
        return (values * mask).sum()
    if mode == "seq_mean_token_mean":
        tokens = mask.sum(dim=1)
        row_means = (values * mask).sum(dim=1) / tokens.clamp(min=1.0)
        return (row_means * (tokens > 0).to(values.dtype)).sum()
    raise ValueError(f"unknown loss aggregation {mode!r}")


def loss_normaliser(mask: Tensor, mode: LossAgg = "token_mean", constant: float | None = None) -> float:
    """The denominator of :func:`aggregate`, as a plain count over the rows of ``mask`` [B, L].

    "token_mean": the number of tokens that count; "seq_mean_token_mean": the number of rows with at
    least one such token; "constant": B * constant (Dr. GRPO). Counts add up over a partition of the
    rows (and can be all-reduced over processes), so computing it once over a whole mini-batch and
    dividing every micro-batch's :func:`loss_sum` by it gives the mini-batch's aggregate whatever the
    micro-batch partition (verl issue 5625). Never 0: an empty part normalises to 1 (or 1 * constant).
    """
    if mode == "token_mean":
        return max(float(mask.sum()), 1.0)
    if mode == "seq_mean_token_mean":
        return max(float((mask.sum(dim=1) > 0).sum()), 1.0)
    if mode == "constant":
        if constant is None or constant <= 0:
            raise ValueError("aggregate mode 'constant' needs a positive constant")
        return float(max(mask.shape[0], 1) * constant)  # no rows: the sum is 0 anyway
    raise ValueError(f"unknown loss aggregation {mode!r}")


def aggregate(
    values: Tensor, mask: Tensor, mode: LossAgg = "token_mean", constant: float | None = None
) -> Tensor:
    """Reduce per-token values to the scalar loss: ``loss_sum / loss_normaliser`` over one batch.

    Args:
        values: [B, L] per-token loss.
        mask: [B, L] 1 on the tokens that count.
        mode: "token_mean": sum(v * m) / sum(m) (every token of the batch weighs the same);
            "seq_mean_token_mean": mean over rows (with at least one token) of each row's token mean;
            "constant": sum(v * m) / (B * constant) (Dr. GRPO: a fixed normaliser, e.g. max length).
        constant: the normaliser for mode "constant".
    Returns:
        scalar tensor; 0 when no token counts.
    """
    return loss_sum(values, mask, mode) / loss_normaliser(mask, mode, constant)


def role_normalisers(
    mask: Tensor,
    reinforce_rows: Tensor,
    separate: bool,
    mode: LossAgg = "token_mean",
    constant: float | None = None,
) -> tuple[float, float]:
    """The (GRPO, REINFORCE) normalisers of a mini-batch for :func:`role_loss_sums`.

    Args:
        mask: [B, L] 1 on the response tokens of the whole mini-batch.
        reinforce_rows: [B] bool, True for AEPO REINFORCE rows.
        separate: False ("replace", reference code): both parts share the mini-batch's normaliser;
            True ("add", the paper's J_GRPO + alpha * J_REINFORCE): each part over its own rows.
    Returns:
        two counts (see :func:`loss_normaliser`), to be all-reduced when rows are spread over ranks.
    """
    if not separate:
        shared = loss_normaliser(mask, mode, constant)
        return shared, shared
    reinforce_rows = reinforce_rows.bool()
    return (
        loss_normaliser(mask[~reinforce_rows], mode, constant),
        loss_normaliser(mask[reinforce_rows], mode, constant),
    )


def role_loss_sums(
    token_loss: Tensor, mask: Tensor, reinforce_rows: Tensor, mode: LossAgg = "token_mean"
) -> tuple[Tensor, Tensor]:
    """The (GRPO, REINFORCE) :func:`loss_sum` of a micro-batch; token_loss, mask [B, L], rows [B]."""
    r = reinforce_rows.to(token_loss.dtype).unsqueeze(1)
    return loss_sum(token_loss * (1.0 - r), mask, mode), loss_sum(token_loss * r, mask, mode)


def role_losses(
    token_loss: Tensor,
    mask: Tensor,
    reinforce_rows: Tensor,
    separate: bool,
    mode: LossAgg = "token_mean",
    constant: float | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch's aggregated loss split into its GRPO part and its REINFORCE part.

    Args:
        token_loss: [B, L] per-token loss (row weights, e.g. alpha, already applied).
        mask: [B, L] 1 on the tokens that count.
        reinforce_rows: [B] bool, True for AEPO REINFORCE rows.
        separate: False ("replace" mode, the reference code): both parts share the batch's
            normaliser (e.g. all its response tokens), so grpo + reinforce == aggregate(token_loss);
            True ("add" mode, the paper's grad J_GRPO + alpha * E[grad log pi * R]): each part is
            aggregated over its own rows only (token_mean: its own token count; constant: its own
            row count times the constant), so neither part is diluted by the other's tokens.
        mode, constant: see :func:`aggregate`.
    Returns:
        (grpo scalar, reinforce scalar); a part with no rows is 0. The update step uses the same
        pieces (:func:`role_loss_sums` / :func:`role_normalisers`) with mini-batch normalisers.
    """
    grpo_norm, reinforce_norm = role_normalisers(mask, reinforce_rows, separate, mode, constant)
    grpo_sum, reinforce_sum = role_loss_sums(token_loss, mask, reinforce_rows, mode)
    return grpo_sum / grpo_norm, reinforce_sum / reinforce_norm


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref) on tokens sampled from pi (Schulman's k3).

    Args:
        logp: [B, L] log pi(token).
        ref_logp: [B, L] log ref(token).
    Returns:
        [B, L] exp(ref - logp) - (ref - logp) - 1, which is >= 0 everywhere and 0 where they agree.

    Computed as expm1(d) - d, clamped at 0: in float32, exp(d) - d - 1 rounds to small negatives
    (down to -6e-8) for |d| < 1e-3 (406 of 20001 points in [-1e-3, 1e-3]), and a KL summed over a
    batch then read -4e-10 (the rollout mismatch of a fp32 update on a CPU without bf16).
    """
    diff = (ref_logp - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.expm1(diff) - diff).clamp_min(0.0)


RolloutCorrection = Literal["none", "token_truncate", "sequence_mask"]


def rollout_correction_weights(
    trainer_logp: Tensor, rollout_logp: Tensor, mask: Tensor, mode: RolloutCorrection, cap: float
) -> Tensor:
    """Importance weights that correct the policy-gradient term for the rollout-trainer mismatch.

    The engine samples from pi_rollout (vLLM's kernels, bf16, its own processing); the trainer's
    pi_old recomputes the same tokens and differs a little. The weight on each token is a function of
    rho = pi_old / pi_rollout (TRL's vllm_importance_sampling_mode, verl's rollout importance
    sampling; Yao et al., "Your efficient RL framework secretly brings you off-policy RL training"):
      - "none": 1 everywhere (the reference algorithm);
      - "token_truncate": min(rho_t, cap) per token (truncated importance sampling);
      - "sequence_mask": 1 on every token of a row whose sequence ratio prod_t rho_t <= cap, else 0
        (the row leaves the gradient: it was sampled where the trainer's policy puts far more mass).

    Args:
        trainer_logp, rollout_logp: [B, L] log-probs of the sampled tokens (trainer's pi_old; engine's).
        mask: [B, L] 1 on the tokens to weight (response tokens of the rows to correct).
        mode: see above. cap: C > 1.
    Returns:
        [B, L] weights, no gradient, 0 where `mask` is 0.
    """
    if mode == "none":
        return mask.clone()
    log_ratio = (trainer_logp.detach() - rollout_logp) * mask
    if mode == "token_truncate":
        return torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)).clamp(max=cap) * mask
    if mode == "sequence_mask":  # compared in log space: a long row's product would overflow
        keep = (log_ratio.sum(dim=1, keepdim=True) <= math.log(cap)).to(mask.dtype)
        return keep * mask
    raise ValueError(f"unknown rollout correction {mode!r} (none, token_truncate, sequence_mask)")


@torch.no_grad()
def rollout_mismatch(trainer_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the engine's sampled-token log-probs are from the trainer's, as sums to aggregate.

    Args:
        trainer_logp, rollout_logp: [B, L] log-probs of the sampled tokens; mask: [B, L] tokens to count.
    Returns:
        {"abs_sum": sum |delta|, "max_abs": max |delta|, "k3_sum": sum of k3 KL(pi_rollout || pi_old)
        per token (exp(d) - d - 1 with d = trainer - rollout: the tokens were sampled from the
        engine), "tokens": count}, delta = trainer - rollout (nats).
    """
    delta = (trainer_logp.float() - rollout_logp.float()) * mask
    tokens = float(mask.sum())
    return {
        "abs_sum": float(delta.abs().sum()),
        "max_abs": float(delta.abs().max()) if tokens else 0.0,
        "k3_sum": float((kl_k3(rollout_logp.float(), trainer_logp.float()) * mask).sum()),
        "tokens": tokens,
    }


def clipped_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped surrogate loss (to minimise), with optional dual clip.

    ratio r = exp(logp - old_logp), clipped to [1 - clip_low, 1 + clip_high];
    loss = max(-A r, -A clip(r)); for A < 0 with dual_clip c: loss = min(that, -A c).

    Args:
        logp, old_logp, advantages: [B, L].
    Returns:
        (loss [B, L], boolean [B, L] indicator tensors: "ratio", "clipped_low", "clipped_high",
        "dual_clipped") where clipped_* mark tokens whose clipped branch is the active one.
    """
    log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    # the clipped branch wins (strictly) only where the ratio left the trust region in the direction
    # the advantage pushes: above 1 + clip_high for A > 0, below 1 - clip_low for A < 0
    clip_active = clipped > unclipped
    clipped_high = clip_active & (ratio > 1.0)
    clipped_low = clip_active & (ratio < 1.0)
    dual_clipped = torch.zeros_like(clip_active)
    if dual_clip is not None:
        # for A < 0 a huge ratio makes -A r unbounded; dual clip caps the loss at -A * c
        cap = -advantages * dual_clip
        negative = advantages < 0
        dual_clipped = negative & (loss > cap)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    return loss, {
        "ratio": ratio,
        "clipped_low": clipped_low,
        "clipped_high": clipped_high,
        "dual_clipped": dual_clipped,
    }


@torch.no_grad()
def policy_loss_diagnostics(
    logp: Tensor, old_logp: Tensor, mask: Tensor, ind: dict[str, Tensor]
) -> dict[str, float]:
    """Diagnostics of a :func:`clipped_token_loss` step over the masked tokens.

    Args:
        logp, old_logp, mask: [B, L]; ind: the indicator tensors clipped_token_loss returned.
    Returns:
        floats: clip_frac (any clip), clip_frac_low, clip_frac_high, dual_clip_frac (fractions of
        masked tokens), approx_kl (masked mean of old - new), approx_kl_k3 (masked mean of k3 of
        KL(old || new)), ratio_mean/max/min.
    """
    m = mask.bool()
    n = int(m.sum().item())
    if n == 0:
        keys = ("clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "approx_kl_k3")
        out = {k: 0.0 for k in keys}
        out.update(ratio_mean=1.0, ratio_max=1.0, ratio_min=1.0)
        return out
    fmask = mask.float()
    ratio = ind["ratio"].detach().float()
    low = ind["clipped_low"].float()
    high = ind["clipped_high"].float()
    return {
        "clip_frac": masked_mean(torch.maximum(low, high), fmask).item(),
        "clip_frac_low": masked_mean(low, fmask).item(),
        "clip_frac_high": masked_mean(high, fmask).item(),
        "dual_clip_frac": masked_mean(ind["dual_clipped"].float(), fmask).item(),
        "approx_kl": masked_mean((old_logp - logp).detach().float(), fmask).item(),
        # samples come from the old policy, so KL(old || new) is k3 with pi = old, ref = new
        "approx_kl_k3": masked_mean(kl_k3(old_logp.detach().float(), logp.detach().float()), fmask).item(),
        "ratio_mean": masked_mean(ratio, fmask).item(),
        "ratio_max": ratio[m].max().item(),
        "ratio_min": ratio[m].min().item(),
    }
