"""The entropy the optimiser's momentum will carry the policy to: the adaptive controller's look-ahead
reading (``algorithm.entropy_lookahead``).

    moves = pending_momentum(optimizer)              # [(param, d)]: what AdamW's first moment still holds
    with displaced([(p, 0.1 * d) for p, d in moves]):   # theta + 0.1 d, restored bit for bit afterwards
        h_up = ...                                    # the entropy there (and h at theta, h_down at -0.1 d)
    ahead = first_order_ahead(h, h_up, h_down, 0.1)  # H(theta) + grad H . d

Why: AdamW's first moment (beta1 0.9) spreads each gradient over about ten later steps, so the
entropy the update measures lags the push the controller chose by about ten iterations, the lag
that turns the adaptive controller's loop into slow swings (docs/results.md). That part of the lag
is known exactly: with no further gradient, the moment m_t still moves the parameters by

    d = - sum_{k >= 1} lr * m_hat_{t+k} / (sqrt(v_hat_{t+k}) + eps),  m_{t+k} = beta1^k m_t,  v_{t+k} = beta2^k v_t,

so reading the entropy there (a Smith predictor built on the optimiser instead of a fitted model)
shows the controller a step's whole eventual effect at the next reading, not a tenth of it. Not
included: the weight decay's own drift (lr * weight_decay * theta per step) and whatever later
gradients do -- those are what the controller still has to answer.

To first order: H(theta) + grad H . d, by a central difference (:func:`first_order_ahead`), not
H(theta + d). d carries the gradients' noise too, and a sharp policy's entropy rises whichever way
it is moved: measured on the embedded task at H 0.060 (64 x 8 rows, iteration 16 of a 0.08 run),
H(theta + d) read 0.138 and H(theta - d) 0.194, a second-order rise of +0.106 against a first-order
change of -0.010 (the same -0.010 / -0.011 with probes of 0.05 d and 0.1 d). The noise's part is
what later gradients pull back; read at theta + d itself, the reading stayed far above the
policy's while that fell, and the controller pushed down at full strength (docs/results.md).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

# the central difference's step as a fraction of d: small enough that the third-order rest is small
# (0.05 and 0.1 agreed within 10% where a whole d was dominated by the second order), large enough
# that the two readings differ well above float32 round-off of a mean over thousands of tokens
PROBE = 0.1


def first_order_ahead(h: float, h_up: float, h_down: float, probe: float = PROBE) -> float:
    """H(theta) + grad H . d from readings at theta and theta +- probe * d (a central difference).

    Args:
        h, h_up, h_down: the entropy at theta, theta + probe * d and theta - probe * d (nats/token).
        probe: > 0, the step as a fraction of d.
    Returns:
        h + (h_up - h_down) / (2 * probe): the second-order term cancels (exact for an H quadratic in
        the step), e.g. 0.060, 0.06078, 0.06276, 0.1 -> 0.0501.
    """
    if probe <= 0:
        raise ValueError(f"probe must be > 0, got {probe}")
    return h + (h_up - h_down) / (2.0 * probe)


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
