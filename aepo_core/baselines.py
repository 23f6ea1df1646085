"""The paper's comparison methods: entropy-shaped advantages, entropy bonus, adaptive bonus.

- entropy_adv (Cheng et al., arXiv 2506.14758): A_t' = A_t + min(alpha * H_t.detach(), |A_t| / kappa)
- entropy_reg: loss - c * entropy (the bonus term is :func:`entropy_bonus_term`; with the ``nll``
  estimator the per-token entropy is :func:`nll_entropy_surrogate`, whose gradient is the
  score-function estimate of the entropy gradient)
- adaptive_entropy: the bonus coefficient c moves by delta per step toward a target entropy
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_shaped_advantages(
    advantages: Tensor, token_entropy: Tensor, alpha: float, kappa: float
) -> Tensor:
    """Entropy-based advantage shaping.

    Args:
        advantages: [B, L] per-token advantages A_t.
        token_entropy: [B, L] exact entropy H_t of pi_old at each token (detached here).
        alpha: scale of the entropy term (0.4 in Cheng et al.).
        kappa: the bonus never exceeds |A_t| / kappa (2 in Cheng et al.), so it cannot flip a sign.
    Returns:
        [B, L] A_t + min(alpha * H_t, |A_t| / kappa).
    """
    bonus = torch.minimum(alpha * token_entropy.detach().to(advantages.dtype), advantages.abs() / kappa)
    return advantages + bonus


def nll_entropy_surrogate(logp: Tensor) -> Tensor:
    """Per-token entropy for an ``nll`` entropy bonus: value -log p, gradient the score function.

    Differentiating -log p(y) with the sampled token y held fixed has expectation
    E_y[-grad log p(y)] = 0, so a bonus on plain -log p pushes nothing in expectation. With
    H = E_y[-log p(y)], grad H = E_y[-(log p(y) + 1) grad log p(y)] = E_y[-log p(y) grad log p(y)]
    (because E_y[grad log p(y)] = 0). The surrogate s = (-log p).detach() * log p has exactly that
    gradient; its value is not the entropy, so the returned tensor is
    ``(-log p).detach() + (s - s.detach())``: its value is the nll entropy (for logging and for the
    loss value) and its gradient is the score-function estimate of grad H.

    Args:
        logp: [B, L] log pi(sampled token) with grad, tokens sampled from pi (or pi_old).
    Returns:
        [B, L] tensor equal to -logp in value whose gradient is (-logp).detach() * grad logp.
    """
    nll = (-logp).detach()
    surrogate = nll * logp
    return nll + (surrogate - surrogate.detach())


def entropy_bonus_term(entropy: Tensor, coef: float) -> Tensor:
    """The term added to the loss for an entropy bonus: -coef * entropy (scalar -> scalar)."""
    return -coef * entropy


def update_entropy_coef(coef: float, entropy: float, target: float, delta: float = 0.005) -> float:
    """One step of the adaptive entropy coefficient (TRL-style).

    Args:
        coef: current bonus coefficient.
        entropy: the entropy measured this step.
        target: the entropy to steer toward.
        delta: step size.
    Returns:
        coef + delta if entropy < target, coef - delta if entropy > target, unchanged if equal,
        clamped to [0, 1].
    """
    if entropy < target:
        coef = coef + delta
    elif entropy > target:
        coef = coef - delta
    return float(min(1.0, max(0.0, coef)))
