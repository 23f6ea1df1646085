"""The paper's comparison methods: entropy-shaped advantages, entropy bonus, adaptive bonus.

- entropy_adv (Cheng et al., arXiv 2506.14758): A_t' = A_t + min(alpha * H_t.detach(), |A_t| / kappa)
- entropy_reg: loss - c * entropy (the bonus term is :func:`entropy_bonus_term`; with the ``nll``
  estimator the per-token entropy is :func:`nll_entropy_surrogate`, whose gradient is the
  score-function estimate of the entropy gradient)
- adaptive_entropy: the bonus coefficient c moves by delta per step toward a target entropy
- clip_cov / kl_cov (Cui et al., arXiv 2505.22617): detach the gradient of, or put a KL penalty on, the
  few tokens whose log-prob and advantage covary most
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


# ---------------------------------------------------------------------------------------- Clip-Cov / KL-Cov
# Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
# (arXiv 2505.22617), section 5; verl's policy-loss modes "clip_cov" and "kl_cov". Entropy falls
# where log pi(y) and A(y) covary most (a confident token with a high advantage); both methods act on
# a small fraction of those tokens only.


def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token centred cross-product (log pi(y_t) - mean log pi) * (A_t - mean A) over the mask.

    Args:
        logp: [B, L] current log-probs (detached here).
        advantages: [B, L] per-token advantages.
        mask: [B, L] 1 on the tokens that count.
    Returns:
        [B, L] float32; the means are over the masked tokens; masked-out positions are 0. Its mean
        over the mask is the covariance of the paper's Eq. (7), token by token.
    """
    m = mask.to(torch.float32)
    n = m.sum().clamp(min=1.0)
    lp = logp.detach().float()
    adv = advantages.detach().float()
    lp_mean = (lp * m).sum() / n
    adv_mean = (adv * m).sum() / n
    return (lp - lp_mean) * (adv - adv_mean) * m


def clip_cov_selection(
    cov: Tensor, mask: Tensor, excluded: Tensor, fraction: float, low: float, high: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Clip-Cov: a random fraction of the tokens whose covariance lies strictly in (low, high).

    Args:
        cov: [B, L] from :func:`token_covariance`.
        mask: [B, L] 1 on the tokens that count.
        excluded: [B, L] bool, tokens never selected (verl: those PPO's clip already stopped).
        fraction: r, the number selected is max(1, int(r * number of masked tokens)), at most the
            number of candidates (2e-4 in the paper).
        low, high: the covariance window (1 and 5 in the paper).
        generator: RNG for the random choice (None: torch's global RNG).
    Returns:
        [B, L] bool: the tokens whose gradient is detached.
    """
    candidates = (cov > low) & (cov < high) & mask.bool() & ~excluded.bool()
    flat = torch.nonzero(candidates.flatten()).flatten()
    chosen = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if len(flat):
        count = min(max(1, int(fraction * float(mask.sum()))), len(flat))
        order = torch.randperm(len(flat), generator=generator)[:count].to(flat.device)
        chosen[flat[order]] = True
    return chosen.view_as(cov)


def kl_cov_selection(cov: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """KL-Cov: the top ``fraction`` of the masked tokens by covariance (ties: lower flat index first).

    Args:
        cov: [B, L] from :func:`token_covariance`.
        mask: [B, L] 1 on the tokens that count.
        fraction: k, the number selected is max(1, int(k * number of masked tokens)) (2e-3 in the
            paper for 7B models); 0 masked tokens select nothing.
    Returns:
        [B, L] bool: the tokens that get the KL penalty.
    """
    valid = torch.nonzero(mask.bool().flatten()).flatten()
    chosen = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if len(valid):
        count = min(max(1, int(fraction * len(valid))), len(valid))
        values = cov.flatten()[valid]
        # stable descending order, so equal covariances are taken in position order
        order = torch.sort(values, descending=True, stable=True).indices[:count]
        chosen[valid[order]] = True
    return chosen.view_as(cov)


def kl_cov_penalty(logp: Tensor, old_logp: Tensor, selected: Tensor, coef: float) -> Tensor:
    """KL-Cov's per-token penalty coef * |log pi - log pi_old| on the selected tokens, 0 elsewhere.

    logp (with grad), old_logp, selected: [B, L] -> [B, L] (add it to the PPO token loss).
    """
    return coef * (logp - old_logp.detach()).abs() * selected.to(logp.dtype)
