import math

import pytest
import torch

from aepo_core.core.losses import (
    aggregate,
    clipped_token_loss,
    kl_k3,
    masked_mean,
    policy_loss_diagnostics,
    role_loss_sums,
    role_losses,
    role_normalisers,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_token_mean():
    # (1 + 2 + 4) / 3 tokens
    assert aggregate(VALUES, MASK, "token_mean").item() == pytest.approx(7 / 3)


def test_seq_mean_token_mean():
    # row means (1 + 2) / 2 = 1.5 and 4 / 1 = 4, mean (1.5 + 4) / 2 = 2.75
    assert aggregate(VALUES, MASK, "seq_mean_token_mean").item() == pytest.approx(2.75)


def test_seq_mean_skips_rows_without_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # only row 0 counts: (1 + 2) / 2
    assert aggregate(VALUES, mask, "seq_mean_token_mean").item() == pytest.approx(1.5)


def test_constant_normaliser():
    # (1 + 2 + 4) / (B * constant) = 7 / (2 * 10)
    assert aggregate(VALUES, MASK, "constant", constant=10.0).item() == pytest.approx(0.35)
    with pytest.raises(ValueError):
        aggregate(VALUES, MASK, "constant")


def test_empty_mask_gives_zero():
    zero = torch.zeros_like(MASK)
    for mode in ("token_mean", "seq_mean_token_mean"):
        assert aggregate(VALUES, zero, mode).item() == 0.0
    assert masked_mean(VALUES, zero).item() == 0.0


def policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0, row_weights=None):
    """The policy loss of a batch of policy rows as update_step assembles it from the production
    pieces: clipped_token_loss, the row weights, role_loss_sums over role_normalisers (token mean,
    one mini-batch, one micro-batch), and policy_loss_diagnostics."""
    token_loss, ind = clipped_token_loss(logp, old, adv, clip_low, clip_high, dual_clip)
    if row_weights is not None:
        token_loss = token_loss * row_weights.unsqueeze(1)
    policy_rows = torch.zeros(logp.shape[0], dtype=torch.bool)
    grpo_sum, reinforce_sum = role_loss_sums(token_loss, mask, policy_rows)
    grpo_norm, _ = role_normalisers(mask, policy_rows, separate=False)
    assert reinforce_sum.item() == 0.0
    return grpo_sum / grpo_norm, policy_loss_diagnostics(logp, old, mask, ind)


def _loss(ratios, advantages, mask=None, **kw):
    logp = torch.log(torch.tensor([ratios], dtype=torch.float32)).requires_grad_(True)
    old = torch.zeros_like(logp)
    adv = torch.tensor([advantages], dtype=torch.float32)
    mask = torch.ones_like(adv) if mask is None else torch.tensor([mask], dtype=torch.float32)
    loss, diag = policy_loss(logp, old, adv, mask, **kw)
    return loss, diag, logp


def test_positive_advantage_clipped_high_has_no_gradient():
    # A = 1, r = 1.5: max(-1.5, -1 * 1.2) = -1.2, the clipped branch: no gradient
    loss, diag, logp = _loss([1.5], [1.0], clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert logp.grad.abs().max().item() == 0.0
    assert diag["clip_frac_high"] == 1.0 and diag["clip_frac_low"] == 0.0


def test_clip_higher_asymmetry():
    # r = 1.25 with A = 1: clip_high 0.28 leaves it unclipped (-1.25); 0.2 clips it to -1.2
    wide, diag_wide, _ = _loss([1.25], [1.0], clip_low=0.2, clip_high=0.28)
    narrow, diag_narrow, _ = _loss([1.25], [1.0], clip_low=0.2, clip_high=0.2)
    assert wide.item() == pytest.approx(-1.25)
    assert narrow.item() == pytest.approx(-1.2)
    assert diag_wide["clip_frac"] == 0.0 and diag_narrow["clip_frac"] == 1.0
    # the low side still clips at 1 - 0.2 = 0.8: A = -1, r = 0.7 -> max(0.7, 0.8) = 0.8
    low, diag_low, _ = _loss([0.7], [-1.0], clip_low=0.2, clip_high=0.28)
    assert low.item() == pytest.approx(0.8)
    assert diag_low["clip_frac_low"] == 1.0


def test_dual_clip_branch():
    # A = -1, r = 5: max(-A r, -A clip(r)) = max(5, 1.2) = 5, capped by -A * 3 = 3
    loss, diag, logp = _loss([5.0], [-1.0], dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert diag["dual_clip_frac"] == 1.0
    loss.backward()
    assert logp.grad.abs().max().item() == 0.0  # the cap is a constant
    off, diag_off, _ = _loss([5.0], [-1.0], dual_clip=None)
    assert off.item() == pytest.approx(5.0)
    assert diag_off["dual_clip_frac"] == 0.0


def test_mixed_tokens_mean_and_diagnostics_ignore_padding():
    # tokens: (A=1, r=1.5) -> -1.2 [clip high]; (A=-1, r=0.5) -> max(0.5, 0.8) = 0.8 [clip low];
    # (A=-1, r=5) -> 3 [dual clip]; (A=1, r=0.5) -> max(-0.5, -0.8) = -0.5; a padded token (r=100)
    loss, diag, _ = _loss([1.5, 0.5, 5.0, 0.5, 100.0], [1.0, -1.0, -1.0, 1.0, 1.0], mask=[1, 1, 1, 1, 0])
    # (-1.2 + 0.8 + 3 - 0.5) / 4 = 0.525
    assert loss.item() == pytest.approx(0.525, abs=1e-6)
    assert diag["clip_frac"] == pytest.approx(0.5)
    assert diag["clip_frac_high"] == pytest.approx(0.25)
    assert diag["clip_frac_low"] == pytest.approx(0.25)
    assert diag["dual_clip_frac"] == pytest.approx(0.25)
    # ratio stats over the 4 real tokens: (1.5 + 0.5 + 5 + 0.5) / 4 = 1.875, max 5, min 0.5
    assert diag["ratio_mean"] == pytest.approx(1.875, abs=1e-5)
    assert diag["ratio_max"] == pytest.approx(5.0, abs=1e-5)
    assert diag["ratio_min"] == pytest.approx(0.5, abs=1e-6)
    # approx_kl = mean(old - new) = -(ln 1.5 + ln 0.5 + ln 5 + ln 0.5) / 4
    #           = -(0.405465 - 0.693147 + 1.609438 - 0.693147) / 4 = -0.157152
    assert diag["approx_kl"] == pytest.approx(-0.157152, abs=1e-5)


def test_row_weights_scale_each_row():
    logp = torch.zeros(2, 2)
    adv = torch.ones(2, 2)
    mask = torch.ones(2, 2)
    # ratio 1 everywhere, per-token loss -1; weights 0.5 and 1: (-0.5 * 2 - 1 * 2) / 4 = -0.75
    loss, _ = policy_loss(logp, logp, adv, mask, row_weights=torch.tensor([0.5, 1.0]))
    assert loss.item() == pytest.approx(-0.75)


def test_on_policy_ratio_one_gives_reinforce_gradient():
    # at ratio 1 the clipped loss with A = +1 has gradient -1 per token / number of tokens
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), torch.ones(1, 3), torch.ones(1, 3))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((1, 3), -1 / 3))


def test_kl_k3_values():
    logp = torch.tensor([math.log(0.5), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.3)])
    # token 0: d = ln 0.25 - ln 0.5 = -0.693147; e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    # token 1: identical -> 0
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.193147, 0.0]), atol=1e-6, rtol=0)
    assert (kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()
    # near agreement, where float32's exp(d) - d - 1 rounds below zero
    d = torch.linspace(-1e-3, 1e-3, 20001)
    assert (torch.exp(d) - d - 1 < 0).any()  # the fault this guards against still exists in float32
    assert (kl_k3(torch.zeros_like(d), d) >= 0).all()


def test_role_losses_shared_and_separate_normalisers():
    # rows 0 (GRPO, tokens 1, 2) and 1 (REINFORCE, token 4)
    reinforce = torch.tensor([False, True])
    grpo, reinf = role_losses(VALUES, MASK, reinforce, separate=False)
    # replace mode: one shared denominator of 3 tokens -> 3/3 + 4/3 == the whole token mean
    assert (grpo.item(), reinf.item()) == pytest.approx((1.0, 4 / 3))
    assert (grpo + reinf).item() == pytest.approx(aggregate(VALUES, MASK).item())
    grpo, reinf = role_losses(VALUES, MASK, reinforce, separate=True)
    # add mode: each part over its own tokens: (1 + 2) / 2 and 4 / 1
    assert (grpo.item(), reinf.item()) == pytest.approx((1.5, 4.0))
    grpo, reinf = role_losses(VALUES, MASK, reinforce, separate=True, mode="constant", constant=10.0)
    # constant: each part over its own rows: 3 / (1 * 10), 4 / (1 * 10)
    assert (grpo.item(), reinf.item()) == pytest.approx((0.3, 0.4))
    grpo, reinf = role_losses(
        VALUES, MASK, torch.tensor([False, False]), separate=True, mode="constant", constant=10.0
    )
    assert (grpo.item(), reinf.item()) == pytest.approx((0.35, 0.0))  # no REINFORCE rows: 0, not nan


def test_rollout_correction_weights_by_hand():
    """rho = pi_old / pi_rollout per token; delta = trainer - rollout (nats)."""
    from aepo_core.core.losses import rollout_correction_weights

    trainer = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    rollout = torch.tensor([[-1.5, -1.0, 0.0], [-1.1, -1.1, -1.1]])  # delta: [0.5, -1.0, pad], [0.6] * 3
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.equal(rollout_correction_weights(trainer, rollout, mask, "none", 3.0), mask)
    # truncated at C = 1.5: e^0.5 = 1.649 -> 1.5, e^-1 = 0.368; e^0.6 = 1.822 -> 1.5
    got = rollout_correction_weights(trainer, rollout, mask, "token_truncate", 1.5)
    torch.testing.assert_close(got, torch.tensor([[1.5, math.exp(-1.0), 0.0], [1.5, 1.5, 1.5]]))
    # sequence ratios: e^(0.5 - 1.0) = 0.61 <= 3 kept; e^(3 * 0.6) = 6.05 > 3 masked
    got = rollout_correction_weights(trainer, rollout, mask, "sequence_mask", 3.0)
    assert torch.equal(got, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    # identical log-probs: every mode weighs every token 1
    for mode in ("none", "token_truncate", "sequence_mask"):
        assert torch.equal(rollout_correction_weights(trainer, trainer, mask, mode, 3.0), mask), mode
    with pytest.raises(ValueError, match="unknown rollout correction"):
        rollout_correction_weights(trainer, rollout, mask, "token_mask", 3.0)


def test_rollout_mismatch_by_hand():
    from aepo_core.core.losses import rollout_mismatch

    trainer = torch.tensor([[-1.0, -2.0, 0.0]])
    rollout = torch.tensor([[-1.5, -1.0, -9.0]])  # delta 0.5, -1.0; the third token is masked out
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    got = rollout_mismatch(trainer, rollout, mask)
    # k3 of KL(rollout || trainer) on tokens the engine sampled: e^d - d - 1
    k3 = (math.exp(0.5) - 0.5 - 1) + (math.exp(-1.0) + 1.0 - 1)
    assert got == pytest.approx({"abs_sum": 1.5, "max_abs": 1.0, "k3_sum": k3, "tokens": 2.0})
