"""The entropy the optimiser's momentum will carry the policy to: the adaptive controller's look-ahead
reading (``algorithm.entropy_lookahead``).

    extra = pending_momentum(optimizer)              # [param] displacements still in AdamW's first moment
    with displaced(params, extra):                   # theta + extra, restored bit for bit afterwards
        ... measure the entropy ...

Why: AdamW's first moment (beta1 0.9) spreads each gradient over about ten later steps, so the
entropy the update measures lags the push the controller chose by about ten iterations, the lag
that turns the adaptive controller's loop into slow swings (docs/results.md). That part of the lag
is known exactly: with no further gradient, the moment m_t still moves the parameters by

    d = - sum_{k >= 1} lr * m_hat_{t+k} / (sqrt(v_hat_{t+k}) + eps),  m_{t+k} = beta1^k m_t,  v_{t+k} = beta2^k v_t,

so reading the entropy at theta + d (a Smith predictor built on the optimiser instead of a fitted
model) shows the controller the whole eventual effect of its last choice one iteration later. Not
included: the weight decay's own drift (lr * weight_decay * theta per step) and whatever later
gradients do -- those are what the controller still has to answer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


@functools.cache
def momentum_horizon(beta1: float, beta2: float, step: int, tol: float = 1e-9, max_terms: int = 100_000) -> float:
    """How many of step t's Adam updates the first moment still holds, if every later gradient is 0.

    c = sum_{k >= 1} beta1^k * (1 - beta1^t) / (1 - beta1^(t+k)) * sqrt((1 - beta2^(t+k)) / (1 - beta2^t)) / beta2^(k/2)

    the k-th later update m_hat_{t+k} / sqrt(v_hat_{t+k}) relative to step t's own m_hat_t / sqrt(v_hat_t)
    (torch.optim.AdamW's bias corrections; eps left out of the ratio, see :func:`pending_momentum`).

    Args:
        beta1, beta2: AdamW's betas, in [0, 1) and (0, 1).
        step: t >= 1, the optimiser steps taken (AdamW's ``state["step"]``).
        tol: stop when a term falls under tol.
    Returns:
        c >= 0 (dimensionless); beta1 / (1 - beta1) for large t and beta2 -> 1, e.g. about 9.0 at
        beta1 0.9 (the "about ten steps" of the lag), 0 at beta1 0.
    Raises:
        ValueError: betas or step out of range, or a sum that does not converge
            (beta1 >= sqrt(beta2)).
    """
    if not (0.0 <= beta1 < 1.0 and 0.0 < beta2 < 1.0) or step < 1:
        raise ValueError(f"momentum_horizon needs beta1 in [0, 1), beta2 in (0, 1) and step >= 1; got {beta1}, {beta2}, {step}")
    if beta1 >= beta2**0.5:
        raise ValueError(f"beta1 {beta1} >= sqrt(beta2) {beta2**0.5}: the pending updates do not shrink")
    total, k = 0.0, 1
    c1, c2 = 1.0 - beta1**step, 1.0 - beta2**step
    while k <= max_terms:
        term = beta1**k * c1 / (1.0 - beta1 ** (step + k)) * ((1.0 - beta2 ** (step + k)) / c2) ** 0.5 / beta2 ** (k / 2)
        total += term
        if term < tol:
            return total
        k += 1
    raise ValueError(f"momentum_horizon did not converge in {max_terms} terms (beta1 {beta1}, beta2 {beta2})")


@torch.no_grad()
def pending_momentum(optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, Tensor]]:
    """The displacement AdamW's first moment still holds, parameter by parameter.

    d = -lr * c * m_hat_t / (sqrt(v_hat_t) + eps), c = :func:`momentum_horizon` (beta1, beta2, t):
    the sum in the module docstring with eps taken at step t's scale (exact for eps 0; eps is 1e-8
    against sqrt(v_hat) of about 1e-4 or more on a trained parameter).

    Args:
        optimizer: a torch.optim.AdamW (or Adam) after at least one step; parameters without state
            (never stepped) are left out.
    Returns:
        [(parameter, d)] with d like the parameter (its dtype and device).
    Raises:
        ValueError: an optimiser without AdamW's moments (exp_avg, exp_avg_sq, step), or amsgrad.
    """
    out: list[tuple[Tensor, Tensor]] = []
    for group in optimizer.param_groups:
        if group.get("amsgrad"):
            raise ValueError("pending_momentum: amsgrad's max of v is not modelled")
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            if not {"exp_avg", "exp_avg_sq", "step"} <= state.keys():
                raise ValueError(f"pending_momentum needs AdamW's state (exp_avg, exp_avg_sq, step); got {sorted(state)}")
            t = int(state["step"])
            if t < 1:
                continue
            c = momentum_horizon(float(beta1), float(beta2), t)
            m_hat = state["exp_avg"] / (1.0 - beta1**t)
            denom = (state["exp_avg_sq"] / (1.0 - beta2**t)).sqrt().add_(group["eps"])
            out.append((p, (m_hat / denom).mul_(-group["lr"] * c).to(p.dtype)))
    return out


@contextlib.contextmanager
def displaced(moves: Sequence[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Inside the block every parameter p of ``moves`` is p + d; afterwards p is restored bit for bit
    (from a copy: (p + d) - d is not p in floating point)."""
    saved = [p.detach().clone() for p, _ in moves]
    try:
        with torch.no_grad():
            for p, d in moves:
                p.add_(d)
        yield
    finally:
        with torch.no_grad():
            for (p, _), s in zip(moves, saved, strict=True):
                p.copy_(s)
