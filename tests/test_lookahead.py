"""The look-ahead reading (algorithm.entropy_lookahead): AdamW's pending momentum, by hand and
against AdamW itself, and the entropy the controller reads with it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen
from test_update import policy_batch

from aepo_core.config import AlgorithmConfig, Config, TrainerConfig
from aepo_core.core.aepo import ControllerState
from aepo_core.core.algorithms import make_algorithm
from aepo_core.core.entropy import exact_entropy, nll_entropy, shifted_logprobs_and_entropy
from aepo_core.core.lookahead import displaced, first_order_ahead, momentum_horizon, pending_momentum
from aepo_core.core.update import entropy_ahead, make_optimizer, update_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_momentum_horizon_by_hand():
    # large t: no bias correction left; beta1 0.5, beta2 0.81: sum_k (0.5 / 0.9)^k = (5/9) / (4/9) = 1.25
    assert momentum_horizon(0.5, 0.81, 10**6) == pytest.approx(1.25, rel=1e-8)
    # beta2 -> 1: beta1 / (1 - beta1), the "about ten steps" at beta1 0.9
    assert momentum_horizon(0.9, 1 - 1e-12, 10**14) == pytest.approx(9.0, rel=1e-6)
    assert momentum_horizon(0.0, 0.999, 5) == 0.0  # no first moment: nothing pending
    # t = 1, beta1 0.5, beta2 0.81, first term: 0.5 * 0.5 / 0.75 * sqrt(0.3439 / 0.19) / 0.9
    first = 0.5 * 0.5 / 0.75 * (0.3439 / 0.19) ** 0.5 / 0.9
    assert first == pytest.approx(0.49828, abs=1e-5)
    assert momentum_horizon(0.5, 0.81, 1) > first
    with pytest.raises(ValueError, match="step >= 1"):
        momentum_horizon(0.9, 0.999, 0)
    with pytest.raises(ValueError, match="do not shrink"):
        momentum_horizon(0.9, 0.5, 3)


@pytest.mark.parametrize("steps", [1, 3, 40])
def test_pending_momentum_is_where_adamw_goes_on_zero_gradients(steps):
    # AdamW itself, fed zero gradients after `steps` noisy ones, ends where pending_momentum said
    # (float64: 600 float32 additions to a parameter of size 1 would round off more than the test checks)
    g = torch.Generator().manual_seed(steps)
    p = torch.nn.Parameter(torch.randn(64, generator=g, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, eps=0.0)
    for _ in range(steps):
        p.grad = torch.randn(64, generator=g, dtype=torch.float64) + 0.5
        opt.step()
    ((q, d),) = pending_momentum(opt)
    assert q is p
    start = p.detach().clone()
    for _ in range(600):  # 0.9^600 / sqrt(0.999)^600 is below 1e-26
        p.grad = torch.zeros(64, dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(d, p.detach() - start, rtol=1e-7, atol=1e-12)  # the sum stops at terms under 1e-9


def test_pending_momentum_skips_unstepped_parameters_and_refuses_amsgrad():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert [p for p, _ in pending_momentum(opt)] == [a]
    ams = torch.optim.AdamW([a], lr=0.1, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        pending_momentum(ams)


def test_displaced_moves_inside_and_restores_bit_for_bit():
    p = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))
    before = p.detach().clone()
    d = torch.tensor([1e-3, 1e7, -0.7])  # (0.2 + 1e7) - 1e7 is not 0.2 in float32
    with displaced([(p, d)]):
        torch.testing.assert_close(p.detach(), before + d)
    assert torch.equal(p.detach(), before)
    with pytest.raises(RuntimeError), displaced([(p, d)]):
        raise RuntimeError("a failed measurement")
    assert torch.equal(p.detach(), before)


def _entropies(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp, ent = shifted_logprobs_and_entropy(logits, batch.input_ids)
    return exact_entropy(ent, batch.response_mask).item(), nll_entropy(logp, batch.response_mask).item()


def test_first_order_ahead_by_hand():
    # the measured case in lookahead's docstring: 0.060 + (0.06078 - 0.06276) / 0.2
    assert first_order_ahead(0.060, 0.06078, 0.06276, 0.1) == pytest.approx(0.0501)
    # H quadratic in the step, H(s) = 1 + 2 s + 5 s^2: the first-order value at s = 1 is 3, whatever the probe
    quad = lambda s: 1 + 2 * s + 5 * s**2  # noqa: E731
    assert first_order_ahead(quad(0), quad(0.3), quad(-0.3), 0.3) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="probe"):
        first_order_ahead(0.1, 0.1, 0.1, 0.0)


def test_entropy_ahead_is_the_first_order_entropy_at_the_displaced_parameters():
    model, batch = tiny_qwen(), policy_batch()
    trainer = TrainerConfig(lr=1e-2, dtype="float32")  # the hand forward passes are float32
    opt = make_optimizer(model, trainer)
    algo = AlgorithmConfig(name="grpo", entropy_estimator="exact")
    for _ in range(3):
        update_step(model, opt, batch, None, algo, trainer, ControllerState(), group_size=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ahead = entropy_ahead(model, opt, batch, trainer)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
    moves = pending_momentum(opt)
    at = {}
    for scale in (0.0, 0.1, -0.1):
        with displaced([(p, d * scale) for p, d in moves]):
            at[scale] = _entropies(model, batch)
    for i, key in enumerate(("entropy/exact_policy_rows_ahead", "entropy/nll_policy_rows_ahead")):
        expected = at[0.0][i] + (at[0.1][i] - at[-0.1][i]) / 0.2
        assert ahead[key] == pytest.approx(expected, abs=1e-5)
        assert abs(ahead[key] - at[0.0][i]) > 1e-4  # lr 1e-2: the momentum moves it
    # beta1 0: no first moment, nothing pending: the reading ahead is the reading now
    plain = make_optimizer(model, TrainerConfig(lr=1e-2, betas=(0.0, 0.999)))
    update_step(model, plain, batch, None, algo, trainer, ControllerState(), group_size=2)
    assert entropy_ahead(model, plain, batch, trainer)["entropy/exact_policy_rows_ahead"] == pytest.approx(
        _entropies(model, batch)[0], abs=1e-6)


def test_the_controller_reads_ahead_and_the_target_stays_on_the_policy():
    cfg = AlgorithmConfig(controller="adaptive", combine="add", target_entropy=0.1, entropy_estimator="exact",
                          entropy_lookahead=True)
    algo = make_algorithm(cfg)
    assert algo.entropy_metric() == "entropy/exact_policy_rows"
    assert algo.control_metric() == "entropy/exact_policy_rows_ahead"
    state = algo.initial_state()
    after = algo.next_state(state, algo.decide(state),
                            {"entropy/exact_policy_rows": 0.2, "entropy/exact_policy_rows_ahead": 0.05})
    assert after.h_prev == 0.05  # what the proportional term reads: ahead
    # the integral reads the policy's own 0.2: e = (0.1 - 0.2) / 0.1 = -1, I = 1.0 + 0.05 * -1
    assert after.adaptive_t == pytest.approx(cfg.adaptive_t_init - cfg.adaptive_gain)
    # T = I + kp * e(ahead) = 0.95 + 1.0 * (0.1 - 0.05) / 0.1 = 1.45
    assert algo.decide(after).temperature == pytest.approx(0.95 + 0.5)
    plain = make_algorithm(AlgorithmConfig(entropy_estimator="exact"))
    assert plain.control_metric() == plain.entropy_metric()


def test_lookahead_config_errors():
    with pytest.raises(ValueError, match="entropy_rows 'policy'"):
        AlgorithmConfig(entropy_lookahead=True, entropy_rows="all")
    with pytest.raises(ValueError, match="one process"):
        Config.model_validate({"algorithm": {"entropy_lookahead": True}, "trainer": {"nproc": 2}})
