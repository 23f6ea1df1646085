import math

import pytest
import torch

from aepo_core.core.entropy import (
    exact_entropy,
    nll_entropy,
    shifted_logprobs_and_entropy,
    token_logprobs_and_entropy,
)


def test_two_token_distribution_by_hand():
    # logits [0, ln 3] -> p = [0.25, 0.75]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    # log 0.75 = -0.287682
    assert logp.item() == pytest.approx(-0.287682, abs=1e-6)
    # H = 0.25 * ln 4 + 0.75 * ln(4/3) = 0.346574 + 0.215762 = 0.562335
    assert ent.item() == pytest.approx(0.562335, abs=1e-6)


def test_uniform_distribution():
    logits = torch.zeros(1, 2, 4)
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([[0, 3]]))
    # ln 4 = 1.386294
    torch.testing.assert_close(logp, torch.full((1, 2), -1.386294), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, torch.full((1, 2), 1.386294), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_equals_unchunked_values_and_gradients(chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    ref_lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(logits, -1)
    ref_ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    (g_ref,) = torch.autograd.grad((ref_lp.sum() + ref_ent.sum()), logits)
    lp, ent = token_logprobs_and_entropy(logits, labels, chunk=chunk)
    torch.testing.assert_close(lp, ref_lp.float())
    torch.testing.assert_close(ent, ref_ent.float())
    (g,) = torch.autograd.grad(lp.sum() + ent.sum(), logits)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_entropy_without_grad_when_not_needed():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    lp, ent = token_logprobs_and_entropy(
        logits, torch.zeros(2, 4, dtype=torch.long), chunk=2, entropy_grad=False
    )
    assert lp.requires_grad and not ent.requires_grad
    lp_only, none = token_logprobs_and_entropy(
        logits, torch.zeros(2, 4, dtype=torch.long), with_entropy=False
    )
    assert none is None
    torch.testing.assert_close(lp_only, lp)


def test_shifted_uses_previous_position_logits():
    # position t's token is scored by the logits at t - 1; position 0 has no context -> 0
    logits = torch.zeros(1, 3, 2)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])  # predicts token 1 with p 0.75
    logits[0, 1] = torch.tensor([math.log(3.0), 0.0])  # predicts token 0 with p 0.75
    logits[0, 2] = torch.tensor([100.0, -100.0])  # last position predicts nothing in the batch
    input_ids = torch.tensor([[0, 1, 0]])
    logp, ent = shifted_logprobs_and_entropy(logits, input_ids, chunk=1)
    torch.testing.assert_close(logp, torch.tensor([[0.0, math.log(0.75), math.log(0.75)]]))
    # entropies of the first two positions' distributions, 0.562335 each (see above)
    torch.testing.assert_close(ent, torch.tensor([[0.0, 0.562335, 0.562335]]), atol=1e-6, rtol=0)


def test_masked_estimators():
    logp = torch.tensor([[-9.0, -1.0, -2.0], [-9.0, -3.0, -9.0]])
    token_entropy = torch.tensor([[9.0, 0.5, 1.5], [9.0, 2.5, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    # nll: (1 + 2 + 3) / 3 = 2; exact: (0.5 + 1.5 + 2.5) / 3 = 1.5
    assert nll_entropy(logp, mask).item() == pytest.approx(2.0)
    assert exact_entropy(token_entropy, mask).item() == pytest.approx(1.5)
