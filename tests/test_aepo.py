import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aepo_core.config import AlgorithmConfig
from aepo_core.core.aepo import (
    ControllerState,
    assemble_batch,
    choose_temperature,
    controller_action,
    reinforce_count,
    select_positive_samples,
)
from aepo_core.core.batch import SequenceBatch
from aepo_core.core.losses import clipped_token_loss, loss_normaliser, loss_sum


def test_bang_bang_temperature():
    # T_high iff h_prev <= target
    assert choose_temperature(0.0, 0.5, 1.2, 0.8) == 1.2  # before step 1, h_prev = 0
    assert choose_temperature(0.5, 0.5, 1.2, 0.8) == 1.2  # equality counts as "not above"
    assert choose_temperature(0.51, 0.5, 1.2, 0.8) == 0.8


def test_fixed_controller_ignores_entropy():
    cfg = AlgorithmConfig(controller="fixed", fixed_temperature=1.5)
    assert controller_action(ControllerState(h_prev=9.0), cfg).temperature == 1.5
    assert controller_action(ControllerState(h_prev=0.0), cfg).temperature == 1.5
    bang = AlgorithmConfig(target_entropy=0.5, t_high=1.3, t_low=0.7)
    assert controller_action(ControllerState(h_prev=0.6), bang).temperature == 0.7


def test_select_positive_samples_strictly_above_threshold():
    adv = torch.tensor([0.5, 0.05, -1.0, 0.0501, 0.0])
    assert select_positive_samples(adv, 0.05).tolist() == [0, 3]
    assert select_positive_samples(torch.zeros(4), 0.05).numel() == 0


@pytest.mark.parametrize(
    "num_pos, K, h_prev, target, halve, expected",
    [
        (10, 8, 0.3, 0.5, True, 8),  # min(8, 10)
        (5, 8, 0.3, 0.5, True, 5),  # min(8, 5)
        (10, 8, 0.7, 0.5, True, 4),  # above target: 8 // 2
        (3, 8, 0.7, 0.5, True, 1),  # 3 // 2
        (1, 8, 0.7, 0.5, True, 0),  # 1 // 2
        (10, 8, 0.7, 0.5, False, 8),  # halving off
        (0, 8, 0.3, 0.5, True, 0),  # empty POS: 0, no crash
        (0, 8, 0.7, 0.5, True, 0),
        (10, 8, 0.5, 0.5, True, 8),  # h_prev == H*: not above the target, no halving
    ],
)
def test_reinforce_count(num_pos, K, h_prev, target, halve, expected):
    assert reinforce_count(num_pos, K, h_prev, target, halve) == expected


def _policy_batch():
    b = SequenceBatch.from_token_lists(
        [[1], [1], [1], [1]], [[10, 10], [11], [12, 12, 12], [13]], pad_id=0, rewards=[1, 0, 1, 1]
    )
    adv = torch.tensor([0.7, -0.7, 0.0, 0.0]).unsqueeze(1) * b.response_mask
    return b.with_fields(advantages=adv)


def _reg_batch():
    return SequenceBatch.from_token_lists(
        [[2], [2], [2]], [[20], [21, 21, 21, 21], [22, 22]], pad_id=0, rewards=[1, 0, 1], temperatures=1.2
    )


def test_replace_mode_puts_reinforce_rows_first_and_keeps_alignment():
    x = assemble_batch(_policy_batch(), _reg_batch(), torch.tensor([0, 2]), k=2, combine="replace")
    # X = POS[:2] + B[2:]: reg rows 0 and 2, then policy rows 2 and 3; |X| == |B|; the width is the
    # regulariser batch's (5 columns: its row 1 is 1 + 4 tokens), policy rows are right-padded
    assert len(x) == 4
    assert x.roles == ["reinforce", "reinforce", "policy", "policy"]
    assert x.source_index.tolist() == [0, 2, 2, 3]
    assert x.input_ids.tolist() == [[2, 20, 0, 0, 0], [2, 22, 22, 0, 0], [1, 12, 12, 12, 0], [1, 13, 0, 0, 0]]
    assert x.temperatures.tolist() == pytest.approx([1.2, 1.2, 1.0, 1.0])
    assert x.rewards.tolist() == [1.0, 1.0, 1.0, 1.0]
    # +1.0 on every response token of a REINFORCE row, the GRPO advantages elsewhere
    assert x.advantages.tolist() == [[0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert torch.equal(x.advantages != 0, (x.response_mask != 0) & (torch.arange(4) < 2).unsqueeze(1))
    assert x.attention_mask.sum(1).tolist() == [2, 3, 4, 2]
    assert x.weights.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_add_mode_keeps_policy_batch_whole_with_alpha_weight():
    x = assemble_batch(_policy_batch(), _reg_batch(), torch.tensor([0, 2]), k=1, combine="add", alpha=0.3)
    assert len(x) == 5
    assert x.roles == ["reinforce"] + ["policy"] * 4
    assert x.source_index.tolist() == [0, 0, 1, 2, 3]
    assert x.weights.tolist() == pytest.approx([0.3, 1.0, 1.0, 1.0, 1.0])
    assert x.advantages[2].tolist() == pytest.approx([0.0, -0.7, 0.0, 0.0, 0.0])


def test_k_zero_returns_policy_batch():
    x = assemble_batch(_policy_batch(), _reg_batch(), torch.zeros(0, dtype=torch.long), k=0)
    assert x.roles == ["policy"] * 4 and x.input_ids.tolist() == _policy_batch().input_ids.tolist()
    with pytest.raises(ValueError):
        assemble_batch(_policy_batch(), _reg_batch(), torch.tensor([0]), k=2)


def test_controller_state_json_round_trip():
    state = ControllerState(h_prev=0.61, temperature=0.8, k=3, num_positives=7, entropy_coef=0.015, step=12)
    again = ControllerState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state
    assert ControllerState.initial(AlgorithmConfig(adaptive_init_coef=0.2)).entropy_coef == 0.2
    assert ControllerState().h_prev == 0.0
    with pytest.raises(ValueError):
        ControllerState.from_dict({"h_prev": 0.1, "bogus": 1})


def _entropy(logits):
    p = torch.softmax(logits, -1)
    return -(p * torch.log_softmax(logits, -1)).sum()


def _expected_reinforce_step(theta, temperature, lr):
    """One exact expected REINFORCE step (reward 1) on samples drawn at `temperature`, through the
    update step's loss pieces (clipped_token_loss, row weights, loss_sum / loss_normaliser, token
    mean): every vocabulary item is a one-token row weighted by its probability under p^T,
    at ratio 1 (on-policy), advantage +1, so grad = -sum_x p^T(x) grad log p(x) / V."""
    theta = theta.clone().requires_grad_(True)
    v = theta.shape[0]
    logp = torch.log_softmax(theta, -1).unsqueeze(1)  # [V, 1]: row x holds log p(x)
    sample_prob = torch.softmax(theta.detach() / temperature, -1)  # p^T, the sampling law
    mask = torch.ones(v, 1)
    token_loss, _ = clipped_token_loss(logp, logp.detach(), torch.ones(v, 1), 0.2, 0.2, 3.0)
    loss = loss_sum(token_loss * sample_prob.unsqueeze(1), mask) / loss_normaliser(mask)
    loss.backward()
    return (theta - lr * theta.grad).detach()


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-3.0, 3.0), min_size=2, max_size=8),
    temperature=st.one_of(st.floats(1.1, 3.0), st.floats(0.3, 0.9)),
)
def test_reinforce_at_high_temperature_raises_entropy_and_low_lowers_it(logits, temperature):
    theta = torch.tensor(logits, dtype=torch.float64)
    # a uniform policy has maximal entropy and p^T == p: nothing to move
    assume(float(theta.max() - theta.min()) > 0.5)
    before = _entropy(theta).item()
    after = _entropy(_expected_reinforce_step(theta, temperature, lr=1e-3)).item()
    if temperature > 1:
        assert after > before
    else:
        assert after < before


def test_reinforce_at_temperature_one_is_a_fixed_point():
    # E_{x~p}[grad log p(x)] = 0: sampling at T = 1 with reward 1 does not move the policy
    theta = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(_expected_reinforce_step(theta, 1.0, lr=0.1), theta)


def test_boundary_h_prev_equal_to_target_raises_entropy_without_halving():
    cfg = AlgorithmConfig(target_entropy=0.5, t_high=1.2, t_low=0.8, reinforce_sample_num=8)
    state = ControllerState(h_prev=0.5)
    assert controller_action(state, cfg).temperature == 1.2  # T_high
    assert reinforce_count(10, cfg.reinforce_sample_num, state.h_prev, cfg.target_entropy) == 8
