import pytest
import torch

from aepo_core.core.baselines import (
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


# ------------------------------------------------------------------------------ Clip-Cov / KL-Cov
def test_token_covariance_by_hand():
    from aepo_core.core.baselines import token_covariance

    # masked tokens: logp -1, -2, -3 (mean -2), A 2, 0, 1 (mean 1); the padding token is ignored
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]])
    adv = torch.tensor([[2.0, 0.0], [1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cov = token_covariance(logp, adv, mask)
    # (-1 + 2)(2 - 1) = 1, (0)(-1) = 0, (-1)(0) = 0, padding 0
    torch.testing.assert_close(cov, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_clip_cov_selects_randomly_inside_the_window_only():
    from aepo_core.core.baselines import clip_cov_selection

    cov = torch.tensor([[0.5, 2.0, 3.0, 6.0], [1.0, 4.0, 2.5, 1.5]])
    mask = torch.ones(2, 4)
    excluded = torch.zeros(2, 4, dtype=torch.bool)
    excluded[1, 3] = True  # 1.5 is in the window but PPO's clip already acts on it
    # candidates strictly inside (1, 5), not excluded: 2.0, 3.0, 4.0, 2.5 -> 4 tokens
    window = {(0, 1), (0, 2), (1, 1), (1, 2)}
    seen = set()
    for seed in range(20):
        chosen = clip_cov_selection(cov, mask, excluded, 0.25, 1.0, 5.0, torch.Generator().manual_seed(seed))
        picked = {tuple(i) for i in torch.nonzero(chosen).tolist()}
        assert len(picked) == 2 and picked <= window  # int(0.25 * 8) = 2 tokens
        seen |= picked
    assert seen == window  # random: every candidate is picked by some seed
    # the fraction rounds down but at least one token is taken; none when no candidate
    assert int(clip_cov_selection(cov, mask, excluded, 1e-4, 1.0, 5.0).sum()) == 1
    assert int(clip_cov_selection(cov, mask, excluded, 0.5, 10.0, 20.0).sum()) == 0


def test_kl_cov_selects_the_top_fraction_and_penalises_the_log_ratio():
    from aepo_core.core.baselines import kl_cov_penalty, kl_cov_selection

    cov = torch.tensor([[0.1, 3.0, -2.0], [5.0, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # 9.0 is padding: never selected
    chosen = kl_cov_selection(cov, mask, 0.4)  # int(0.4 * 5) = 2 -> the two largest: 5.0 and 3.0
    assert torch.nonzero(chosen).tolist() == [[0, 1], [1, 0]]
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.5, -1.0], [-1.0, -1.0, -1.0]])
    penalty = kl_cov_penalty(logp, old, chosen, 2.0)
    torch.testing.assert_close(penalty.detach(), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    penalty.sum().backward()
    # d/dlogp of 2 |logp - old|: -2 where logp < old, +2 where logp > old, 0 where not selected
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -2.0, 0.0], [2.0, 0.0, 0.0]]))
