"""Token log-probs and the two entropy estimators, from one forward pass, chunked over the sequence.

- ``nll``:   mean over response tokens of -log pi(sampled token) at T = 1 (what AEPO's reference
             code controls on);
- ``exact``: mean over response tokens of the full-vocabulary entropy of softmax(logits) at T = 1.

Both come from the same logits. The log-softmax is computed one sequence chunk at a time, in float32.

Memory: without grad (old log-probs, reference log-probs, evaluation) only one [B, chunk, V] float32
temporary exists at a time, so no second full-size [B, L, V] copy of the logits (nor a float32 upcast
of bf16 logits) is ever materialised. Under autograd the chunking does NOT bound memory: autograd
keeps each chunk's float32 log_softmax output for the backward pass, so the saved activations add up
to about one full [B, L, V] float32 tensor (a second one, exp(log_softmax), when the entropy is kept
in the graph; ``entropy_grad=False`` avoids that). Use micro-batches to bound the training forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from aepo_core.core.losses import masked_mean


def token_logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    chunk: int = 1024,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    temperature: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each label and the entropy of each predictive distribution, at temperature 1
    (or at a temperature per row).

    ``logits[:, t]`` is the distribution that ``labels[:, t]`` was drawn from (already aligned; use
    :func:`shifted_logprobs_and_entropy` for a causal LM's raw output).

    Args:
        logits: [B, L, V] unnormalised scores (any float dtype; computed in float32 per chunk).
        labels: [B, L] long token ids.
        chunk: sequence positions per chunk; without grad only [B, chunk, V] float32 temporaries
            exist at once (under autograd each chunk's log_softmax is kept for backward).
        with_entropy: also return the full-vocabulary entropy.
        entropy_grad: keep the entropy in the autograd graph (only needed for an exact-entropy
            bonus); False saves the [B, chunk, V] activations autograd would otherwise keep.
        temperature: [B] per-row temperature T > 0, or None for T = 1: the values are those of
            softmax(logits / T), the scaling done in float32 as the rollout engines do (so the
            log-probs match the sampler's to float precision).
    Returns:
        (logp [B, L] float32, entropy [B, L] float32 or None). Gradients flow to ``logits``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    logp_parts, ent_parts = [], []
    for start in range(0, logits.shape[1], chunk):
        lc = logits[:, start : start + chunk].float()
        if temperature is not None:
            lc = lc / temperature.to(device=lc.device, dtype=lc.dtype).view(-1, 1, 1)
        log_probs = F.log_softmax(lc, dim=-1)
        logp_parts.append(log_probs.gather(-1, labels[:, start : start + chunk].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            # H = -sum p log p, with p = exp(log_probs) so both come from one normalisation
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                lp = log_probs if entropy_grad else log_probs.detach()
                ent_parts.append(-(lp.exp() * lp).sum(-1))
    if not logp_parts:
        empty = logits.new_zeros(labels.shape, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    logp = torch.cat(logp_parts, dim=1)
    entropy = torch.cat(ent_parts, dim=1) if with_entropy else None
    return logp, entropy


def shifted_logprobs_and_entropy(
    logits: Tensor,
    input_ids: Tensor,
    chunk: int = 1024,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    temperature: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal-LM version: the log-prob of token t comes from the logits at position t - 1.

    Args:
        logits: [B, L, V] the model output for input_ids.
        input_ids: [B, L] the tokens.
        chunk, with_entropy, entropy_grad, temperature: see :func:`token_logprobs_and_entropy`.
    Returns:
        (logp [B, L], entropy [B, L] or None), aligned with input_ids; position 0 (no context) is 0.
    """
    # logits[:, :-1] is a view: no copy of the [B, L, V] tensor is made here
    logp, entropy = token_logprobs_and_entropy(
        logits[:, :-1], input_ids[:, 1:], chunk, with_entropy, entropy_grad, temperature
    )
    logp = F.pad(logp, (1, 0), value=0.0)
    if entropy is not None:
        entropy = F.pad(entropy, (1, 0), value=0.0)
    return logp, entropy


def nll_entropy(logp: Tensor, mask: Tensor) -> Tensor:
    """The ``nll`` estimator: token mean of -logp over the mask. logp, mask: [B, L] -> scalar."""
    return masked_mean(-logp, mask)


def exact_entropy(token_entropy: Tensor, mask: Tensor) -> Tensor:
    """The ``exact`` estimator: token mean of the full-vocabulary entropy. [B, L] -> scalar."""
    return masked_mean(token_entropy, mask)

