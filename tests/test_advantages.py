import math

import pytest
import torch

from aepo_core.core.advantages import broadcast_to_tokens, group_advantages


def test_group_scaling_hand_values_and_all_equal_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=3, scaling="group")
    # group 1: mean 1/3, unbiased var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3, std 0.577350
    #   (1 - 1/3) / 0.577350 = 1.154700, (0 - 1/3) / 0.577350 = -0.577350
    # group 2: all equal -> 0 / (0 + 1e-6) = 0
    expected = torch.tensor([1.154700, -0.577350, -0.577350, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert torch.equal(adv[3:], torch.zeros(3))


def test_group_of_two():
    # mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.707107 -> +-0.5 / 0.707107 = +-0.707106
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    torch.testing.assert_close(adv, torch.tensor([0.707106, -0.707106]), atol=1e-5, rtol=0)


def test_no_std_scaling_is_dr_grpo():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3, scaling="none")
    # r - group mean: 1 - 1/3, 0 - 1/3, 0 - 1/3, then 1 - 1 three times
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))


def test_batch_std_scaling():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3, scaling="batch")
    # batch mean 2/3, unbiased var (4 (1/3)^2 + 2 (2/3)^2) / 5 = (4/9 + 8/9) / 5 = 0.266667, std 0.516398
    # (2/3) / 0.516398 = 1.290994, (-1/3) / 0.516398 = -0.645497
    expected = torch.tensor([1.290994, -0.645497, -0.645497, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_group_size_one_gives_zero_not_nan():
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0]), group_size=1)
    assert not torch.isnan(adv).any()
    assert torch.equal(adv, torch.zeros(3))


def test_rejects_ragged_groups_and_unknown_scaling():
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), group_size=2)
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0]), group_size=2, scaling="bogus")


def test_broadcast_to_response_tokens_only():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.float32)
    out = broadcast_to_tokens(torch.tensor([0.5, -2.0]), mask)
    assert torch.equal(out, torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, -2.0, -2.0]]))
    assert math.isclose(out.sum().item(), 0.5 * 2 - 2.0 * 2)
