"""The controller: which rows it reads (algorithm.entropy_rows), the adaptive law (PI action on T
within clamps), bang-bang unchanged, and the reachability warning. Values computed by hand."""

from __future__ import annotations

import json

import pytest

from aepo_core.config import AlgorithmConfig, ConfigError, load_config, save_config
from aepo_core.core.aepo import ControllerState, adaptive_integral, adaptive_output, smoothed_slope
from aepo_core.core.algorithms import (
    Decision,
    decision_from_json,
    decision_to_json,
    make_algorithm,
    reachability,
    reachability_message,
)

ADAPTIVE = dict(name="aepo", controller="adaptive", target_entropy=0.2, adaptive_gain=0.25, adaptive_kp=1.0,
                adaptive_t_min=0.8, adaptive_t_max=1.5, adaptive_t_init=1.0, reinforce_sample_num=8)


# ------------------------------------------------------------------------------ the adaptive law
def test_adaptive_output_by_hand():
    # T = clip(I + kp * e): e = (0.2 - 0.1) / 0.2 = 0.5, I 1.0, kp 1.0 -> 1.5
    assert adaptive_output(1.0, 0.1, 0.2, 1.0, 0.8, 1.5) == pytest.approx(1.5)
    # e = (0.2 - 0.25) / 0.2 = -0.25, I 1.1, kp 0.4 -> 1.0
    assert adaptive_output(1.1, 0.25, 0.2, 0.4, 0.8, 1.5) == pytest.approx(1.0)
    # clamps: e = 1 (h = 0) -> 1.0 + 1.0 = 2.0 -> 1.5; e = -1 -> 0.0 -> 0.8
    assert adaptive_output(1.0, 0.0, 0.2, 1.0, 0.8, 1.5) == 1.5
    assert adaptive_output(1.0, 0.4, 0.2, 1.0, 0.8, 1.5) == 0.8
    # kp 0: the output is the integral (pure integral action)
    assert adaptive_output(1.3, 0.1, 0.2, 0.0, 0.8, 1.5) == 1.3


def test_derivative_term_by_hand():
    # T = I + kp * e - kd * slope / H*: I 1.0, e = (0.2 - 0.2) / 0.2 = 0, slope +0.01, H* 0.2, kd 4
    # -> 1.0 - 4 * 0.05 = 0.8 (entropy rising: T comes down before the error shows it)
    assert adaptive_output(1.0, 0.2, 0.2, 1.0, 0.6, 1.5, slope=0.01, kd=4.0) == pytest.approx(0.8)
    # falling at the same rate with e = 0.25 (h 0.15): 1.0 + 0.25 + 0.2 = 1.45
    assert adaptive_output(1.0, 0.15, 0.2, 1.0, 0.6, 1.5, slope=-0.01, kd=4.0) == pytest.approx(1.45)
    # kd 0 is the PI law whatever the slope; the clamps still hold
    assert adaptive_output(1.0, 0.15, 0.2, 1.0, 0.6, 1.5, slope=-0.5, kd=0.0) == pytest.approx(1.25)
    assert adaptive_output(1.0, 0.2, 0.2, 1.0, 0.6, 1.5, slope=-0.5, kd=4.0) == 1.5


def test_proportional_gain_above_the_target_by_hand():
    # above the target: e = (0.2 - 0.25) / 0.2 = -0.25, I 1.1, kp_above 0.4 -> 1.0 (kp 1.0 alone: 0.85)
    assert adaptive_output(1.1, 0.25, 0.2, 1.0, 0.6, 1.5, kp_above=0.4) == pytest.approx(1.0)
    assert adaptive_output(1.1, 0.25, 0.2, 1.0, 0.6, 1.5) == pytest.approx(0.85)
    # below it kp still acts: e = 0.25 -> 1.1 + 0.25 = 1.35, whatever kp_above
    assert adaptive_output(1.1, 0.15, 0.2, 1.0, 0.6, 1.5, kp_above=0.4) == pytest.approx(1.35)
    # through the algorithm: reading 0.25 above H* 0.2, I 1.1, kp_above 0.5 -> T 1.1 - 0.125 = 0.975;
    # the integral keeps its one gain: 1.1 + 0.25 * (-0.25) = 1.0375
    algo = make_algorithm(AlgorithmConfig(**ADAPTIVE, adaptive_kp_above=0.5))
    state = ControllerState(h_prev=0.25, adaptive_t=1.1, step=3)
    assert algo.decide(state).temperature == pytest.approx(0.975)
    assert make_algorithm(AlgorithmConfig(**ADAPTIVE)).decide(state).temperature == pytest.approx(0.85)
    after = algo.next_state(state, algo.decide(state), {algo.entropy_metric(): 0.25})
    assert after.adaptive_t == pytest.approx(1.0375)


def test_smoothed_slope_by_hand():
    # first reading: no past, the smoothed reading is the reading and the slope 0
    assert smoothed_slope(None, 0.1, 0.8) == (0.1, 0.0)
    # S' = 0.8 * 0.1 + 0.2 * 0.15 = 0.11, slope 0.01
    smooth, slope = smoothed_slope(0.1, 0.15, 0.8)
    assert smooth == pytest.approx(0.11) and slope == pytest.approx(0.01)
    # smoothing 0: the raw difference
    assert smoothed_slope(0.1, 0.15, 0.0) == pytest.approx((0.15, 0.05))


def test_adaptive_state_carries_the_smoothed_reading():
    """next_state moves the integral and the derivative's filter from the same reading, and the next
    decision's temperature includes -kd * slope / H*."""
    cfg = AlgorithmConfig(**{**ADAPTIVE, "adaptive_kd": 1.0, "adaptive_smoothing": 0.5, "adaptive_gain": 0.0})
    algo = make_algorithm(cfg)
    metric = algo.entropy_metric()
    state = ControllerState.initial(cfg)
    for h in (0.2, 0.22):  # readings 0.2 then 0.22: S 0.2 -> 0.21, slope 0.01
        decision = algo.decide(state)
        state = algo.next_state(state, decision, {metric: h})
    assert state.adaptive_h_smooth == pytest.approx(0.21) and state.adaptive_slope == pytest.approx(0.01)
    # T = I (1.0, gain 0) + kp * (0.2 - 0.22) / 0.2 - 1.0 * 0.01 / 0.2 = 1.0 - 0.1 - 0.05 = 0.85, inside
    # the clamps [0.8, 1.5], so the derivative term shows (without it: 0.9)
    assert algo.decide(state).temperature == pytest.approx(0.85)
    # the state round-trips through controller.json, and files written before these fields still load
    assert ControllerState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    old = {k: v for k, v in state.to_dict().items() if k not in ("adaptive_h_smooth", "adaptive_slope")}
    assert ControllerState.from_dict(old).adaptive_slope == 0.0


def test_adaptive_integral_by_hand():
    # I + gain * e: e = 0.5, gain 0.25 -> 1.125; e = -0.5 -> 0.875; on target: I stays
    assert adaptive_integral(1.0, 1.0, 0.1, 0.2, 0.25, 0.8, 1.5) == pytest.approx(1.125)
    assert adaptive_integral(1.0, 1.0, 0.3, 0.2, 0.25, 0.8, 1.5) == pytest.approx(0.875)
    assert adaptive_integral(1.3, 1.3, 0.2, 0.2, 0.25, 0.8, 1.5) == 1.3
    # the integral is clamped too: 1.45 + 0.25 -> 1.5; an integral outside the clamps comes back
    assert adaptive_integral(1.45, 1.45, 0.0, 0.2, 0.25, 0.8, 1.5) == 1.5
    assert adaptive_integral(2.0, 1.2, 0.0, 0.2, 0.25, 0.8, 1.5) == 1.5
    assert adaptive_integral(0.5, 1.2, 0.4, 0.2, 0.25, 0.8, 1.5) == 0.8


def test_integral_held_while_closing_by_hand():
    # e = 0.5 (below the target): rising (slope > 0) is closing -> held at 1.0; falling -> 1.0 + 0.125
    assert adaptive_integral(1.0, 1.0, 0.1, 0.2, 0.25, 0.8, 1.5, slope=0.01, hold_while_closing=True) == 1.0
    assert adaptive_integral(1.0, 1.0, 0.1, 0.2, 0.25, 0.8, 1.5, slope=-0.01, hold_while_closing=True) == pytest.approx(1.125)
    # e = -0.5 (above): falling is closing -> held; rising -> 1.0 - 0.125; a flat reading integrates
    assert adaptive_integral(1.0, 1.0, 0.3, 0.2, 0.25, 0.8, 1.5, slope=-0.01, hold_while_closing=True) == 1.0
    assert adaptive_integral(1.0, 1.0, 0.3, 0.2, 0.25, 0.8, 1.5, slope=0.01, hold_while_closing=True) == pytest.approx(0.875)
    assert adaptive_integral(1.0, 1.0, 0.3, 0.2, 0.25, 0.8, 1.5, slope=0.0, hold_while_closing=True) == pytest.approx(0.875)
    # off (the default): the slope is not read
    assert adaptive_integral(1.0, 1.0, 0.1, 0.2, 0.25, 0.8, 1.5, slope=0.01) == pytest.approx(1.125)
    # through the algorithm (the step sampled at u = 1.0 + 0.1 = 1.1, inside the clamps): smoothed
    # 0.08, reading 0.1, smoothing 0.8 -> S 0.084, slope +0.004, e 0.5: held
    algo = make_algorithm(AlgorithmConfig(**ADAPTIVE, adaptive_hold_while_closing=True))
    state = ControllerState(h_prev=0.18, adaptive_t=1.0, adaptive_h_smooth=0.08, step=3)
    new = algo.next_state(state, algo.decide(state), {algo.entropy_metric(): 0.1})
    assert (new.adaptive_t, new.adaptive_slope) == (1.0, pytest.approx(0.004))
    plain = make_algorithm(AlgorithmConfig(**ADAPTIVE))
    assert plain.next_state(state, plain.decide(state), {plain.entropy_metric(): 0.1}).adaptive_t == pytest.approx(1.125)


def test_proportional_term_on_the_smoothed_reading_by_hand():
    # I 1.0, last reading 0.1, smoothed 0.16, H* 0.2, kp 1: u = 1.0 + (0.2 - 0.16) / 0.2 = 1.2 (raw: 1.5)
    state = ControllerState(h_prev=0.1, adaptive_t=1.0, adaptive_h_smooth=0.16, step=4)
    smoothed = make_algorithm(AlgorithmConfig(**ADAPTIVE, adaptive_proportional_smoothed=True))
    assert smoothed.decide(state).temperature == pytest.approx(1.2)
    assert make_algorithm(AlgorithmConfig(**ADAPTIVE)).decide(state).temperature == pytest.approx(1.5)
    # a state written before the smoothed reading existed falls back to the last reading
    old = ControllerState(h_prev=0.1, adaptive_t=1.0, step=4)
    assert smoothed.decide(old).temperature == pytest.approx(1.5)
    # the integral still reads the raw measurement: e = (0.2 - 0.15) / 0.2 = 0.25, I 1.0 + 0.25 * 0.25
    after = smoothed.next_state(state, smoothed.decide(state), {smoothed.entropy_metric(): 0.15})
    assert after.adaptive_t == pytest.approx(1.0625)
    assert after.adaptive_h_smooth == pytest.approx(0.8 * 0.16 + 0.2 * 0.15)


def test_adaptive_law_does_not_wind_up():
    """Conditional integration: while the OUTPUT sits at a clamp with the error pushing outwards, the
    integral holds, so one step of opposite error brings the output back at once."""
    integral, h_low = 1.0, 0.05  # e = 0.75 every step
    for _ in range(20):
        out = adaptive_output(integral, h_low, 0.2, 1.0, 0.8, 1.5)  # 1.0 + 0.75 -> 1.5 (clamped)
        integral = adaptive_integral(integral, out, h_low, 0.2, 0.1, 0.8, 1.5)
    assert out == 1.5 and integral == 1.0  # held: the output was saturated from the first step
    # entropy now above the target (e = -0.5): the output leaves the clamp at once, 1.0 - 0.5 = 0.5 -> 0.8
    assert adaptive_output(integral, 0.3, 0.2, 1.0, 0.8, 1.5) == 0.8
    # with kp 0 (pure integral) the integral itself reaches the clamp and stops there, no further
    integral = 1.0
    for _ in range(20):
        integral = adaptive_integral(integral, integral, 0.0, 0.2, 0.25, 0.8, 1.5)
    assert integral == 1.5
    assert adaptive_integral(integral, integral, 0.3, 0.2, 0.25, 0.8, 1.5) == pytest.approx(1.375)  # e = -0.5


def test_adaptive_controller_through_the_algorithm():
    algo = make_algorithm(AlgorithmConfig(**ADAPTIVE))
    first = algo.decide(algo.initial_state())
    # before any measurement (step 0, h_prev 0): adaptive_t_init, full K, never halved
    assert (first.temperature, first.k_cap, first.halve_k) == (1.0, 8, False)
    # the policy rows read 0.15 (e = +0.25), all rows 0.3: the default reads the policy rows
    metrics = {"entropy/nll": 0.3, "entropy/nll_policy_rows": 0.15, "aepo/k": 2}
    state = algo.next_state(first.state, first, metrics)
    # I = 1.0 + 0.25 * 0.25 = 1.0625; T = I + 1.0 * 0.25 = 1.3125
    assert state.h_prev == 0.15 and state.adaptive_t == pytest.approx(1.0625) and state.step == 1
    second = algo.decide(state)
    assert second.temperature == pytest.approx(1.3125) and second.k_cap == 8
    # entropy above the target (h 0.25, e = -0.25): I = 1.0625 - 0.0625 = 1.0; T = 1.0 - 0.25 = 0.75 -> 0.8
    state = algo.next_state(state, second, {"entropy/nll_policy_rows": 0.25})
    assert state.adaptive_t == pytest.approx(1.0)
    third = algo.decide(state)
    assert (third.temperature, third.k_cap, third.halve_k) == (pytest.approx(0.8), 8, False)
    # an update that measured nothing on the rows read: no integration, I and h_prev kept
    kept = algo.next_state(state, third, {"entropy/nll": 0.9})
    assert kept.adaptive_t == state.adaptive_t and kept.h_prev == state.h_prev
    # entropy_rows "all" reads the all-rows 0.3 instead: e = -0.5, I = 1.0 - 0.125
    every = make_algorithm(AlgorithmConfig(**ADAPTIVE, entropy_rows="all"))
    assert every.entropy_metric() == "entropy/nll"
    assert every.next_state(first.state, first, metrics).adaptive_t == pytest.approx(0.875)


def test_a_measurement_that_did_not_happen_leaves_the_first_temperature():
    algo = make_algorithm(AlgorithmConfig(**ADAPTIVE))
    first = algo.decide(algo.initial_state())
    state = algo.next_state(first.state, first, {})
    assert state.step == 1 and state.adaptive_t is None and algo.decide(state).temperature == 1.0


def test_adaptive_clamps_are_checked():
    with pytest.raises(ConfigError, match="adaptive_t_init"):
        load_config(None, ["algorithm.adaptive_t_init=2.0"])
    with pytest.raises(ConfigError, match="target_entropy"):
        load_config(None, ["algorithm.controller=adaptive", "algorithm.target_entropy=0"])


# ------------------------------------------------------------------------------ bang-bang unchanged
@pytest.mark.parametrize(
    "h_prev, halve, expected",
    [
        (0.0, True, (1.2, 8, False)),  # before step 1: T_high
        (0.5, True, (1.2, 8, False)),  # h == H*: "not above", T_high, not halved
        (0.51, True, (0.8, 4, True)),  # above: T_low, K // 2
        (0.51, False, (0.8, 8, False)),  # halve_above_target off
    ],
)
def test_bang_bang_decisions_are_unchanged(h_prev, halve, expected):
    cfg = AlgorithmConfig(target_entropy=0.5, t_high=1.2, t_low=0.8, reinforce_sample_num=8, halve_above_target=halve)
    d = make_algorithm(cfg).decide(ControllerState(h_prev=h_prev))
    assert (d.temperature, d.k_cap, d.halve_k) == expected
    # its state carries no adaptive temperature
    assert make_algorithm(cfg).next_state(d.state, d, {"entropy/nll_policy_rows": 0.3}).adaptive_t is None


def test_entropy_rows_default_is_the_policy_rows():
    assert AlgorithmConfig().entropy_rows == "policy"
    assert make_algorithm(AlgorithmConfig()).entropy_metric() == "entropy/nll_policy_rows"
    assert make_algorithm(AlgorithmConfig(entropy_estimator="exact")).entropy_metric() == "entropy/exact_policy_rows"
    # the motivating case: all rows 0.30, policy rows 0.17, H* 0.2. Reading all rows, bang-bang
    # thinks the entropy is above the target and picks T_low; the policy rows say raise it (T_high)
    for rows, temperature in (("all", 0.8), ("policy", 1.2)):
        algo = make_algorithm(AlgorithmConfig(target_entropy=0.2, entropy_rows=rows))
        first = algo.decide(algo.initial_state())
        state = algo.next_state(first.state, first, {"entropy/nll": 0.30, "entropy/nll_policy_rows": 0.17})
        assert algo.decide(state).temperature == temperature


def test_controller_json_written_before_the_new_fields_still_loads():
    old = {"h_prev": 0.17, "temperature": 1.2, "k": 3, "num_positives": 7, "entropy_coef": 0.0, "step": 4}
    state = ControllerState.from_dict(old)
    assert (state.adaptive_t, state.at_clamp_iterations, state.clamp_side) == (None, 0, None)
    decision = decision_from_json({"next_temperature": 1.2, "next_k_cap": 8, "next_k_halved": False, "state": old})
    assert decision.state == state
    again = ControllerState(h_prev=0.1, adaptive_t=1.125, at_clamp_iterations=3, clamp_side="max")
    assert ControllerState.from_dict(json.loads(json.dumps(again.to_dict()))) == again


# ------------------------------------------------------------------------------ reachability
def _after(h: float, temperature: float, before: ControllerState | None = None) -> tuple[ControllerState, Decision]:
    """The state after a step sampled at ``temperature`` measured ``h`` (counter carried from ``before``)."""
    state = ControllerState(h_prev=h) if before is None else ControllerState(
        h_prev=h, at_clamp_iterations=before.at_clamp_iterations, clamp_side=before.clamp_side)
    return state, Decision(temperature=temperature, k_cap=8, halve_k=False, state=state)


def test_reachability_counts_steps_at_a_clamp_with_the_error_keeping_its_sign():
    s = ControllerState()
    for _ in range(3):  # adaptive: T at its maximum, entropy still below: 1, 2, 3
        s = reachability(*_after(0.18, 1.5, s), target=0.3, t_min=0.8, t_max=1.5)
    assert (s.at_clamp_iterations, s.clamp_side) == (3, "max")
    # at the maximum but now above the target: reset
    assert reachability(*_after(0.35, 1.5, s), 0.3, 0.8, 1.5).at_clamp_iterations == 0
    # inside the clamps: reset
    assert reachability(*_after(0.18, 1.4, s), 0.3, 0.8, 1.5).at_clamp_iterations == 0
    # the other clamp, entropy above: a new count on the other side
    other = reachability(*_after(0.4, 0.8, s), 0.3, 0.8, 1.5)
    assert (other.at_clamp_iterations, other.clamp_side) == (1, "min")
    # h == H*: no error for the adaptive controller; bang-bang's tie rule counts it as below
    assert reachability(*_after(0.3, 1.5, s), 0.3, 0.8, 1.5).at_clamp_iterations == 0
    assert reachability(*_after(0.3, 1.2, s), 0.3, 0.8, 1.2, tie_is_below=True).at_clamp_iterations == 4


def test_reachability_message_by_hand():
    s = ControllerState(h_prev=0.18, at_clamp_iterations=10, clamp_side="max")
    args = dict(target=0.3, estimator="nll", rows="policy", t_min=0.8, t_max=1.5, window=10)
    assert reachability_message(s, **args) == (
        "target 0.30 not reached: entropy 0.18 (nll, policy rows), T at its maximum 1.5 for 10 iterations")
    assert reachability_message(s, **args, entropy_ceiling=0.25) == (
        "target 0.30 not reached: entropy 0.18 (nll, policy rows), T at its maximum 1.5 for 10 iterations; "
        "a uniformly random valid answer has 0.25 nats/token")
    assert reachability_message(ControllerState(h_prev=0.18, at_clamp_iterations=9, clamp_side="max"), **args) is None
    assert reachability_message(s, **args, ahead=True) == (  # algorithm.entropy_lookahead: the reading ahead
        "target 0.30 not reached: entropy 0.18 (nll, policy rows, read ahead), T at its maximum 1.5 for 10 iterations")
    low = ControllerState(h_prev=0.42, at_clamp_iterations=12, clamp_side="min")
    # the ceiling is an upper reference: not named when the entropy is too high
    assert reachability_message(low, **args, entropy_ceiling=0.25) == (
        "target 0.30 not reached: entropy 0.42 (nll, policy rows), T at its minimum 0.8 for 12 iterations")


def test_adaptive_run_at_its_maximum_is_reported_after_the_window():
    # target 0.3, policy rows stay at 0.18: e = 0.4; pure integral action (kp 0) so T = I:
    # 1.0, 1.1, 1.2, 1.3, 1.4, 1.5 (step 5), 1.5, ...
    algo = make_algorithm(AlgorithmConfig(**{**ADAPTIVE, "target_entropy": 0.3, "adaptive_kp": 0.0}))
    decision = algo.decide(algo.initial_state())
    temperatures, messages = [], []
    for _ in range(15):
        temperatures.append(decision.temperature)
        state = algo.next_state(decision.state, decision, {"entropy/nll_policy_rows": 0.18})
        messages.append(algo.reachability_message(state))
        decision = algo.decide(state)
    assert temperatures[:6] == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4, 1.5]) and temperatures[5:] == [1.5] * 10
    # steps 5..14 sampled at 1.5 and stayed below: 10 at the clamp after step 14, not before
    assert messages[:14] == [None] * 14
    assert messages[14] == "target 0.30 not reached: entropy 0.18 (nll, policy rows), T at its maximum 1.5 for 10 iterations"
    # one step above the target (e = (0.3 - 0.4) / 0.3 = -1/3) moves I (= T) off the clamp, 1.5 - 0.25 / 3, and ends it
    state = algo.next_state(decision.state, decision, {"entropy/nll_policy_rows": 0.4})
    assert state.adaptive_t == pytest.approx(1.5 - 0.25 / 3) and algo.reachability_message(state) is None


def test_bang_bang_always_high_is_reported_and_fixed_never():
    cfg = AlgorithmConfig(target_entropy=0.3, t_high=1.2, t_low=0.8, reach_window=3)
    algo = make_algorithm(cfg)
    decision = algo.decide(algo.initial_state())
    for _ in range(3):  # T_high chosen 3 times in a row, h <= H* after each
        state = algo.next_state(decision.state, decision, {"entropy/nll_policy_rows": 0.2})
        decision = algo.decide(state)
    assert decision.temperature == 1.2 and state.at_clamp_iterations == 3
    assert algo.reachability_message(state) == (
        "target 0.30 not reached: entropy 0.20 (nll, policy rows), T at its maximum 1.2 for 3 iterations")
    fixed = make_algorithm(cfg.model_copy(update={"controller": "fixed"}))
    d = fixed.decide(fixed.initial_state())
    for _ in range(5):
        s = fixed.next_state(d.state, d, {"entropy/nll_policy_rows": 0.2})
        d = fixed.decide(s)
    assert s.at_clamp_iterations == 0 and fixed.reachability_message(s) is None


# ------------------------------------------------------------------------------ the entropy stage
def _fake_update(run, iteration, metrics):
    with run.publish(iteration, "update", {}) as (_, m):
        m.update(metrics)


def _entropy_stages(tmp_path, overrides, iterations, measured):
    """A run directory with `overrides`' config, and `iterations` entropy stages, each after an update
    that measured `measured`: (run, config, the last entropy stage's metrics)."""
    from aepo_core.pipeline import stages
    from aepo_core.pipeline.rundir import RunDir

    cfg = load_config(None, overrides)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    save_config(cfg, run.config_path)
    for i in range(iterations):
        _fake_update(run, i, {**measured, "aepo/k": 2, "aepo/num_positives": 3})
        metrics = stages.entropy(run, i)
    return run, cfg, metrics


def test_entropy_stage_records_the_rows_read_and_warns_once(tmp_path, capsys):
    from aepo_core.pipeline.tracking import latest_reachability

    # e = (0.3 - 0.15) / 0.3 = 0.5: T 1.0 -> 1.75 -> 1.5 (clamp); at the clamp from iteration 1
    run, _, metrics = _entropy_stages(
        tmp_path, ["algorithm.controller=adaptive", "algorithm.target_entropy=0.3", "algorithm.reach_window=2",
                   "algorithm.adaptive_gain=1.5"], 4,
        {"entropy/nll": 0.4, "entropy/exact": 0.5, "entropy/nll_policy_rows": 0.15, "entropy/exact_policy_rows": 0.2})
    controller = json.loads((run.stage_dir(3, "entropy") / "controller.json").read_text())
    assert controller["measured"] == {"nll": 0.4, "exact": 0.5, "nll_policy_rows": 0.15, "exact_policy_rows": 0.2,
                                      "rows": "policy", "read": "entropy/nll_policy_rows", "read_value": 0.15,
                                      "target_metric": "entropy/nll_policy_rows", "target_value": 0.15}
    assert controller["next_temperature"] == 1.5 and controller["state"]["adaptive_t"] == 1.5
    assert metrics["at_clamp_iterations"] == 3 and metrics["entropy_read"] == 0.15 and metrics["target_unreached"] == 1.0
    sentence = "target 0.30 not reached: entropy 0.15 (nll, policy rows), T at its maximum 1.5 for 3 iterations"
    assert run.manifest(3, "entropy")["params"]["reachability"] == sentence
    assert latest_reachability(run) == sentence
    assert run.manifest(0, "entropy")["params"]["reachability"] is None
    out = capsys.readouterr().out
    # said once, when it starts (iteration 2: 2 steps at the clamp), not again at iteration 3
    assert out.count("not reached") == 1
    assert "warning: iteration 2: target 0.30 not reached" in out


class _FakeClient:
    def __init__(self):
        self.calls = []

    def set_tag(self, run_id, key, value):
        self.calls.append(("set", key, value))

    def delete_tag(self, run_id, key):
        self.calls.append(("delete", key))


def test_mlflow_tag_follows_the_latest_entropy_stage(tmp_path):
    from aepo_core.pipeline.rundir import RunDir
    from aepo_core.pipeline.tracking import REACHABILITY_TAG, Tracker

    run = RunDir(tmp_path)
    tracker = Tracker(run, load_config(None))
    tracker.run_id, tracker._client = "r", _FakeClient()
    rec = {}
    for i, message in enumerate([None, "not reached", "not reached", None]):
        with run.publish(i, "entropy", {}, {"reachability": message}):
            pass
        tracker._tag_reachability(rec)
    # set when it starts, not again while unchanged, removed when the target is reached again
    assert tracker._client.calls == [("set", REACHABILITY_TAG, "not reached"), ("delete", REACHABILITY_TAG)]
    assert "reachability_tag" not in rec


def test_flow_summary_line_repeats_the_warning_and_no_artifact_outside_a_flow(tmp_path, monkeypatch):
    import flows.train as train
    from aepo_core.pipeline.rundir import RunDir

    run = RunDir(tmp_path)
    for i, message in enumerate([None, "target 0.30 not reached: ..."]):
        with run.publish(i, "entropy", {}, {"reachability": message}):
            pass
    assert "WARNING" not in train.summary_line(run, 0, 1.0, [])
    assert train.summary_line(run, 1, 1.0, []).endswith("| WARNING target 0.30 not reached: ...")
    # i/N and the time left
    line = train.summary_line(run, 0, 1.25, [], total=30, eta=185.0)
    assert line.startswith("iter 0000/0030 | ") and "| 1.2s, ETA 3m 05s" in line
    assert [train.duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m 05s", "1h 02m"]

    def refuse(**kwargs):
        raise AssertionError("no Prefect artifact outside a flow run")

    monkeypatch.setattr(train, "create_markdown_artifact", refuse)
    train.note_reachability(run, 1)  # a plain call (no flow run context): nothing


def test_select_correct_samples_by_reward():
    import torch

    from aepo_core.core.aepo import select_correct_samples

    assert select_correct_samples(torch.tensor([1.0, 0.0, 1.0, 0.5, 0.51])).tolist() == [0, 2, 4]
    assert select_correct_samples(torch.tensor([0.0, 0.0])).numel() == 0
    assert select_correct_samples(torch.tensor([0.2, 0.1]), threshold=0.15).tolist() == [0]


def test_clamp_side_float32_temperature():
    """The rollout stores T as float32 (0.6 -> 0.60000002): still at the clamp, for both users."""
    import torch

    from aepo_core.core.aepo import clamp_side

    t32 = float(torch.tensor(0.6, dtype=torch.float32))
    assert t32 != 0.6 and clamp_side(t32, below=False, above=True, t_min=0.6, t_max=1.5) == "min"
    assert clamp_side(1.5, below=True, above=False, t_min=0.6, t_max=1.5) == "max"
    assert clamp_side(1.5, below=False, above=True, t_min=0.6, t_max=1.5) is None
    assert clamp_side(None, below=True, above=False, t_min=0.6, t_max=1.5) is None
    # conditional integration holds at that clamp: e < 0 (h above H*) does not lower I further
    assert adaptive_integral(0.7, t32, 0.3, 0.2, 0.25, 0.6, 1.5) == 0.7


# ------------------------------------------------------------------------------ the second actuator (alpha)
SPLIT = dict(ADAPTIVE, combine="add", alpha=1.0, adaptive_alpha_gain=4.0, adaptive_alpha_max=3.0, adaptive_gain=0.1)


def test_split_range_by_hand():
    from aepo_core.core.aepo import output_range, split_range

    # (alpha_max - 1) / gain = 2 / 4 = 0.5 past each clamp
    assert output_range(0.8, 1.5, 4.0, 3.0) == pytest.approx((0.3, 2.0))
    assert output_range(0.8, 1.5, 0.0, 3.0) == (0.8, 1.5)  # off: T's clamps
    # inside T's range alpha is untouched; past it alpha rises by 4 per unit of output
    assert split_range(1.2, 0.8, 1.5, 4.0) == (1.2, 1.0)
    assert split_range(1.75, 0.8, 1.5, 4.0) == pytest.approx((1.5, 2.0))  # 1 + 4 * 0.25
    assert split_range(0.55, 0.8, 1.5, 4.0) == pytest.approx((0.8, 2.0))  # both directions
    assert split_range(2.0, 0.8, 1.5, 0.0) == (1.5, 1.0)


def test_second_actuator_through_the_algorithm():
    """Entropy far below: T goes to its clamp, and what the proportional part asks beyond it raises
    alpha; the integral stays within T's clamps (held there, anti-windup); alpha reaches the update's
    REINFORCE rows; the decision round-trips through controller.json."""
    algo = make_algorithm(AlgorithmConfig(**SPLIT))
    metric = algo.entropy_metric()
    state = ControllerState(h_prev=0.1, adaptive_t=1.48, step=5)
    # u = 1.48 + 1.0 * (0.2 - 0.1) / 0.2 = 1.98: T 1.5, alpha 1 + 4 * 0.48 = 2.92
    d = algo.decide(state)
    assert (d.temperature, d.output, d.alpha) == (pytest.approx(1.5), pytest.approx(1.98), pytest.approx(2.92))
    # T sat at its clamp with the error pushing outwards: the integral holds (it would be 1.53)
    state = algo.next_state(state, d, {metric: 0.1})
    assert state.adaptive_t == pytest.approx(1.48) and state.at_clamp_iterations == 0
    # inside T's range it integrates as without alpha: I 1.0, h 0.18 (e 0.1): u 1.1, alpha 1; I -> 1.01
    inside = ControllerState(h_prev=0.18, adaptive_t=1.0, step=5)
    d_in = algo.decide(inside)
    assert (d_in.temperature, d_in.alpha) == (pytest.approx(1.1), 1.0)
    assert algo.next_state(inside, d_in, {metric: 0.18}).adaptive_t == pytest.approx(1.01)
    # far below (h 0.05, e 0.75): u 2.23 -> the range's top 2.0, alpha 3; reachability counts only there
    state = ControllerState(h_prev=0.05, adaptive_t=1.48, step=6)
    d = algo.decide(state)
    assert (d.output, d.alpha) == (pytest.approx(2.0), pytest.approx(3.0))
    held = algo.next_state(state, d, {metric: 0.05})
    assert held.adaptive_t == pytest.approx(1.48) and held.clamp_side == "max" and held.at_clamp_iterations == 1
    text = reachability_message(held.__class__(**{**held.to_dict(), "at_clamp_iterations": 10}), 0.2, "nll",
                                "policy", 0.8, 1.5, 10, alpha_max=3.0)
    assert "T at its maximum 1.5 and alpha at 3 for 10 iterations" in text
    # at T's clamp with alpha still below its maximum is not "at the clamp"
    below_max = algo.next_state(state, Decision(1.5, 8, False, state, alpha=2.0, output=1.75), {metric: 0.1})
    assert below_max.at_clamp_iterations == 0
    # entropy above the target: below T's minimum alpha rises too (the push down made stronger)
    d = algo.decide(ControllerState(h_prev=0.3, adaptive_t=0.9, step=9))  # u = 0.9 - 0.5 = 0.4: T 0.8, alpha 2.6
    assert (d.temperature, d.alpha) == (pytest.approx(0.8), pytest.approx(2.6))
    again = decision_from_json(json.loads(json.dumps(decision_to_json(d, "nll", {}, 0.2))))
    assert (again.alpha, again.output) == (pytest.approx(2.6), pytest.approx(0.4))



def test_integral_range_by_hand():
    from aepo_core.core.aepo import integral_range

    assert integral_range(0.6, 1.3, 4.0, 3.0) == (0.6, 1.3)  # default: T's clamps
    # past t_max: up to the output range's top, 1.3 + (3 - 1) / 4 = 1.8; downwards still T's minimum
    assert integral_range(0.6, 1.3, 4.0, 3.0, past_t_max=True) == pytest.approx((0.6, 1.8))
    with pytest.raises(ValueError, match="alpha_gain > 0"):
        integral_range(0.6, 1.3, 0.0, 3.0, past_t_max=True)


def test_integral_carries_past_t_max_into_alpha():
    """adaptive_integral_past_t_max: where the default holds the integral at T's clamp, it goes on
    into alpha's range, so a steady error below the target is integrated away; it is held only at the
    output range's top, and it never goes below T's minimum."""
    carry = make_algorithm(AlgorithmConfig(**SPLIT, adaptive_integral_past_t_max=True))
    held = make_algorithm(AlgorithmConfig(**SPLIT))
    metric = carry.entropy_metric()
    # I 1.48, h 0.1 (e 0.5): u = 1.98, T 1.5 -- the default holds I at 1.48; the carry integrates,
    # 1.48 + 0.1 * 0.5 = 1.53, past T's clamp 1.5
    state = ControllerState(h_prev=0.1, adaptive_t=1.48, step=5)
    d = carry.decide(state)
    assert (d.temperature, d.output) == (pytest.approx(1.5), pytest.approx(1.98))
    assert held.next_state(state, held.decide(state), {metric: 0.1}).adaptive_t == pytest.approx(1.48)
    state = carry.next_state(state, d, {metric: 0.1})
    assert state.adaptive_t == pytest.approx(1.53)
    # on target with I past the clamp, alpha stays up: u = I = 1.53, T 1.5, alpha 1 + 4 * 0.03 = 1.12
    on = carry.decide(ControllerState(h_prev=0.2, adaptive_t=1.53, step=6))
    assert (on.temperature, on.alpha, on.output) == (pytest.approx(1.5), pytest.approx(1.12), pytest.approx(1.53))
    # I 1.95, h 0.05 (e 0.75): u at the range's top 2.0 with the error pushing outwards: held at 1.95
    top = ControllerState(h_prev=0.05, adaptive_t=1.95, step=7)
    assert carry.next_state(top, carry.decide(top), {metric: 0.05}).adaptive_t == pytest.approx(1.95)
    # I 1.98, h 0.18 (e 0.1): u = 2.08 saturates at 2.0, so I holds at 1.98 (not 1.99): the test is on u
    near = ControllerState(h_prev=0.18, adaptive_t=1.98, step=7)
    assert carry.next_state(near, carry.decide(near), {metric: 0.18}).adaptive_t == pytest.approx(1.98)
    # entropy above (h 0.3, e -0.5) from I 1.9: u = 1.4, I unwinds by 0.05 a step, 1.85
    above = ControllerState(h_prev=0.3, adaptive_t=1.9, step=8)
    assert carry.next_state(above, carry.decide(above), {metric: 0.3}).adaptive_t == pytest.approx(1.85)
    # downwards nothing changes: I 0.82, h 0.3 (e -0.5): u = 0.32, past T's minimum: held at 0.82
    low = ControllerState(h_prev=0.3, adaptive_t=0.82, step=9)
    assert carry.next_state(low, carry.decide(low), {metric: 0.3}).adaptive_t == pytest.approx(0.82)
    with pytest.raises(ConfigError, match="adaptive_integral_past_t_max"):
        load_config(None, ["algorithm.controller=adaptive", "algorithm.target_entropy=0.1",
                           "algorithm.adaptive_integral_past_t_max=true"])  # no second actuator


def test_second_actuator_needs_the_adaptive_controller_and_add():
    with pytest.raises(ConfigError, match="adaptive_alpha_gain"):
        load_config(None, ["algorithm.adaptive_alpha_gain=4", "algorithm.controller=adaptive",
                           "algorithm.target_entropy=0.1"])  # combine replace (the default)
    with pytest.raises(ConfigError, match="adaptive_alpha_gain"):
        load_config(None, ["algorithm.adaptive_alpha_gain=4", "algorithm.combine=add"])  # bang-bang


def test_entropy_stage_records_alpha_for_the_update(tmp_path):
    """The entropy stage writes the second actuator's alpha and output into controller.json (what the
    next update reads) and logs alpha; its warning names both limits."""
    from aepo_core.pipeline import stages

    # e = (0.3 - 0.15) / 0.3 = 0.5: u = 1.0 + 2 * 0.5 = 2.0 (the output range's top, 1.5 + 2 / 4):
    # T 1.5, alpha 1 + 4 * 0.5 = 3
    run, cfg, metrics = _entropy_stages(
        tmp_path, ["algorithm.controller=adaptive", "algorithm.combine=add", "algorithm.target_entropy=0.3",
                   "algorithm.adaptive_gain=0", "algorithm.adaptive_kp=2", "algorithm.adaptive_alpha_gain=4",
                   "algorithm.adaptive_alpha_max=3", "algorithm.reach_window=2"], 3,
        {key: 0.15 for key in ("entropy/nll", "entropy/exact", "entropy/nll_policy_rows", "entropy/exact_policy_rows")})
    controller = json.loads((run.stage_dir(2, "entropy") / "controller.json").read_text())
    assert controller["next_temperature"] == 1.5
    assert controller["next_alpha"] == pytest.approx(3.0) and controller["next_output"] == pytest.approx(2.0)
    assert metrics["next_alpha"] == pytest.approx(3.0) and metrics["at_clamp_iterations"] == 2
    assert "T at its maximum 1.5 and alpha at 3 for 2 iterations" in run.manifest(2, "entropy")["params"]["reachability"]
    assert stages.controller_decision(run, cfg, 3).alpha == pytest.approx(3.0)  # what the update of iteration 3 uses
