import pytest
import torch

from aepo_core.baselines import (
    entropy_bonus_term,
    entropy_shaped_advantages,
    nll_entropy_surrogate,
    update_entropy_coef,
)


def test_entropy_shaped_advantages_hand_values():
    adv = torch.tensor([[1.0, -1.0, 0.1, 0.0]])
    ent = torch.tensor([[0.5, 3.0, 2.0, 1.0]], requires_grad=True)
    out = entropy_shaped_advantages(adv, ent, alpha=0.4, kappa=2.0)
    # 1 + min(0.4*0.5, 1/2) = 1.2;  -1 + min(1.2, 0.5) = -0.5;
    # 0.1 + min(0.8, 0.05) = 0.15;  0 + min(0.4, 0) = 0
    torch.testing.assert_close(out, torch.tensor([[1.2, -0.5, 0.15, 0.0]]))
    assert not out.requires_grad  # H is detached


def test_entropy_bonus_term_sign():
    # loss - c * H: a larger entropy lowers the loss
    assert entropy_bonus_term(torch.tensor(2.0), 0.03).item() == pytest.approx(-0.06)


@pytest.mark.parametrize(
    "coef, entropy, target, expected",
    [
        (0.1, 0.3, 0.5, 0.105),  # below target: up by delta
        (0.1, 0.7, 0.5, 0.095),  # above target: down by delta
        (0.1, 0.5, 0.5, 0.1),  # at target: unchanged
        (0.0, 0.7, 0.5, 0.0),  # clamped at 0
        (0.998, 0.1, 0.5, 1.0),  # 1.003 clamped at 1
    ],
)
def test_update_entropy_coef(coef, entropy, target, expected):
    assert update_entropy_coef(coef, entropy, target, 0.005) == pytest.approx(expected)


def test_nll_surrogate_value_is_nll_and_expected_gradient_is_entropy_gradient():
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    log_p = torch.log_softmax(theta, -1)
    p = log_p.exp().detach()
    entropy = -(log_p.exp() * log_p).sum()
    (grad_h,) = torch.autograd.grad(entropy, theta, retain_graph=True)
    expected = torch.zeros_like(theta)
    plain = torch.zeros_like(theta)
    for y in range(5):
        s = nll_entropy_surrogate(log_p[y].reshape(1, 1))
        assert s.item() == pytest.approx(-log_p[y].item())  # the value is the nll, not the surrogate
        (g,) = torch.autograd.grad(s.sum(), theta, retain_graph=True)
        expected += p[y] * g  # exact expectation over the sampled token y ~ p
        (g_plain,) = torch.autograd.grad(-log_p[y], theta, retain_graph=True)
        plain += p[y] * g_plain
    assert grad_h.abs().max() > 1e-3
    torch.testing.assert_close(expected, grad_h)
    # differentiating plain -log p with the token fixed: zero gradient in expectation
    torch.testing.assert_close(plain, torch.zeros_like(theta))
