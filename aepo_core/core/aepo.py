"""AEPO's regulariser: the temperature controller, the positive samples, and batch assembly.

One step (aepo-algorithm.md):
  T   = T_high if H_prev <= H* else T_low                     (bang-bang controller; or "adaptive":
                                                                PID action on T, adaptive_output,
                                                                and on alpha beyond T's clamps)
  POS = rows of the regulariser batch B_T with A_T > threshold
  k   = min(K, |POS|), halved (k // 2) when H_prev > H*      (weaker push downwards; bang-bang only)
  X   = POS[:k] + B[k:]  ("replace", the reference code)  or  POS[:k] + B  ("add", paper's alpha)
Every token of a REINFORCE row gets advantage +1.0. The REINFORCE rows come first so an in-order
split puts them in the first, exactly on-policy mini-batch, where the clip is inactive and their
gradient is plain REINFORCE.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from aepo_core.config import AlgorithmConfig
from aepo_core.core.batch import ROLE_POLICY, ROLE_REINFORCE, SequenceBatch

Combine = Literal["replace", "add"]


@dataclass
class ControllerState:
    """What the controller carries from one step to the next; persist it with the checkpoint.

    h_prev: entropy measured during the previous update, in the configured estimator's units
        (0.0 before step 1, so the first step samples at T_high when H* >= 0).
    temperature: the regulariser temperature used at the last step (None before step 1).
    k: REINFORCE rows used at the last step.
    num_positives: |POS| at the last step.
    entropy_coef: the bonus coefficient of the adaptive_entropy baseline; only adaptive_entropy
        reads or moves it (aepo, grpo and entropy_adv ignore it, and entropy_reg uses the fixed
        algorithm.entropy_coef instead). Carried through unchanged by the other algorithms.
    step: updates done so far.
    adaptive_t: the adaptive controller's integral state I, a temperature (the balance point it has
        learnt; clamped like the output, so it cannot wind up beyond the clamps); None for the other
        controllers and before the first measurement (then algorithm.adaptive_t_init). Full
        precision, unlike ``temperature`` (float32, as the rollout stored it).
    at_clamp_iterations: consecutive steps the actuator sat at a clamp with the error keeping its
        sign (aepo_core.core.algorithms.reachability); 0 when it is not at a clamp.
    clamp_side: "max" (T at its maximum, entropy still below H*) or "min" (T at its minimum,
        entropy still above H*) while at_clamp_iterations > 0, else None.
    adaptive_h_smooth: the adaptive controller's smoothed reading (nats/token, an exponential
        moving average of the readings, :func:`smoothed_slope`); None before the first measurement.
    adaptive_slope: the smoothed reading's change at the last measurement (nats/token per
        iteration), what the derivative term acts on; 0.0 before the second measurement.

    Fields added after the first release have defaults, so older controller.json files still load.
    """

    h_prev: float = 0.0
    temperature: float | None = None
    k: int = 0
    num_positives: int = 0
    entropy_coef: float = 0.0
    step: int = 0
    adaptive_t: float | None = None
    at_clamp_iterations: int = 0
    clamp_side: str | None = None
    adaptive_h_smooth: float | None = None
    adaptive_slope: float = 0.0

    @classmethod
    def initial(cls, algo_cfg: AlgorithmConfig) -> ControllerState:
        """The state before the first step of a run configured by ``algo_cfg``."""
        return cls(entropy_coef=float(algo_cfg.adaptive_init_coef))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (plain floats/ints/None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControllerState:
        """Inverse of :meth:`to_dict`; unknown keys are rejected so a wrong file fails loudly."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown controller state keys: {sorted(unknown)}")
        return cls(**data)


def choose_temperature(h_prev: float, target: float, t_high: float, t_low: float) -> float:
    """Bang-bang controller: T_high iff h_prev <= target (raise entropy), else T_low (lower it)."""
    return float(t_high if h_prev <= target else t_low)


def relative_error(h: float, target: float) -> float:
    """e = (H* - h) / H*: > 0 when the entropy is below the target (raise T). H* > 0."""
    return (target - h) / target


def adaptive_output(
    integral: float, h: float, target: float, kp: float, t_min: float, t_max: float,
    slope: float = 0.0, kd: float = 0.0, kp_above: float | None = None,
) -> float:
    """The adaptive controller's output: u = clip(I + kp * e - kd * slope / H*, t_min, t_max).

    u is the temperature itself unless the second actuator is on (:func:`split_range`).

    Args:
        integral: I, the integral state (the temperature at which the regulariser balances GRPO's
            pull, as the controller has learnt it).
        h: the last measured entropy (nats/token, the controller's estimator and rows); target: H* > 0.
        kp: proportional gain, temperature per unit of relative error e = (H* - h) / H*.
        t_min, t_max: the clamps: T's, or :func:`output_range` with the second actuator (alpha).
        slope: the smoothed reading's change per iteration (nats/token; :func:`smoothed_slope`).
        kd: derivative gain, temperature per unit of relative change per iteration (slope / H*).
        kp_above: the proportional gain while the entropy is above the target (e < 0); None: kp.
    Returns:
        u in [t_min, t_max].

    Why a proportional term: T sets the *rate* at which entropy moves (the plant integrates), so
    integral action alone makes a double integrator that oscillates undamped; kp * e answers the
    current error at once and damps the loop. Why a derivative term: the update's optimiser
    (AdamW, beta1 0.9) spreads a step's push over about ten later steps, so entropy keeps moving
    after T has turned; acting on the reading's trend (on the measurement, not the error, so a
    changed target does not kick T) adds the phase lead that lag takes away (docs/architecture.md,
    "The controller"). kd 0 is the PI law. Why a gain of its own above the target: GRPO's pull is
    always on and already pushes entropy down, so the plant answers a drop of T faster and for
    longer than a rise (the reference code's bang-bang likewise halves k above the target); the
    integral keeps one gain, so the mean error still goes to zero.
    """
    error = relative_error(h, target)
    gain = kp if kp_above is None or error >= 0 else kp_above
    t = integral + gain * error - kd * slope / target
    return float(min(max(t, t_min), t_max))


def smoothed_slope(smooth: float | None, h: float, smoothing: float) -> tuple[float, float]:
    """One step of the derivative term's filter: S' = smoothing * S + (1 - smoothing) * h.

    Args:
        smooth: S, the smoothed reading so far (nats/token); None before the first reading.
        h: the new reading (nats/token).
        smoothing: in [0, 1); the weight of the past (0: the raw reading's difference).
    Returns:
        (S', S' - S): the new smoothed reading and its change this iteration (nats/token per
        iteration); the change is 0.0 at the first reading, where there is no S.

    Why smooth: one iteration's reading has noise of about 0.006 nats at 16 x 8 rows (7% of a 0.08
    target), and a difference of raw readings doubles its variance; at smoothing 0.8 the slope's
    noise is about a third of the raw difference's.
    """
    if smooth is None:
        return float(h), 0.0
    new = smoothing * smooth + (1.0 - smoothing) * h
    return float(new), float(new - smooth)


def clamp_side(temperature: float | None, below: bool, above: bool, t_min: float, t_max: float) -> str | None:
    """Which clamp an actuator sat at with the error pushing further into it, if any.

    Args:
        temperature: what the step sampled at (None: no regulariser batch); float32 as the rollout
            stored it, so the clamps are compared with a 1e-6 relative tolerance (0.6 is 0.60000002).
        below / above: the entropy the step measured is below / above the target.
        t_min, t_max: the clamps.
    Returns:
        "max" (at t_max with the entropy still below), "min" (at t_min, still above) or None.
    """
    if temperature is None:
        return None
    if below and (temperature >= t_max or math.isclose(temperature, t_max, rel_tol=1e-6)):
        return "max"
    if above and (temperature <= t_min or math.isclose(temperature, t_min, rel_tol=1e-6)):
        return "min"
    return None


def adaptive_integral(
    integral: float, sampled: float, h: float, target: float, gain: float, t_min: float, t_max: float,
    slope: float = 0.0, hold_while_closing: bool = False,
) -> float:
    """One step of the adaptive controller's integral state: I_next = clip(I + gain * e, t_min, t_max).

    Args:
        integral: I before the step.
        sampled: the temperature the measured step sampled at (the controller's output then).
        h: what that step measured; target: H* > 0 (e = (H* - h) / H*).
        gain: integral gain, temperature per iteration per unit of relative error.
        t_min, t_max: the integral's range, :func:`integral_range` (T's clamps, or past t_max into
            alpha's range); ``sampled`` is compared with the same range.
        slope: the smoothed reading's change at this measurement (nats/token per iteration,
            :func:`smoothed_slope`).
        hold_while_closing: hold I while the smoothed reading already moves towards the target
            (error and slope of the same sign: below the target and rising, or above and falling).
            Measured at 0.08 on the CPU (2 seeds): worse (13.9 / 19.8% against 11.1 / 8.1%): with
            reading noise as large as the error the slope's sign is half noise, so the hold mostly
            halves the gain and I trails the balance point.
    Returns:
        I_next in [t_min, t_max].

    Anti-windup: I is clamped, and an error that pushes further into a clamp the output already sat
    at is not integrated (conditional integration), so after any number of steps at t_max one step
    of opposite error moves the output off it at once. The integral is what follows the policy: as
    GRPO sharpens it, the temperature that balances GRPO's pull rises, and I tracks it.
    """
    error = relative_error(h, target)
    # held: the output at a clamp, pushed outwards (anti-windup); or, with hold_while_closing, already
    # closing, where the push that moves it is enough and the optimiser's lag (about ten steps) would
    # turn more integral into an overshoot
    held = (clamp_side(sampled, error > 0, error < 0, t_min, t_max) is not None
            or (hold_while_closing and error * slope > 0))
    return float(min(max(integral + (0.0 if held else gain * error), t_min), t_max))


def output_range(t_min: float, t_max: float, alpha_gain: float, alpha_max: float) -> tuple[float, float]:
    """The adaptive controller's output range (lo, hi), in temperature units.

    Without the second actuator (alpha_gain 0) it is T's clamps. With it (split range), the output
    u continues past each clamp by (alpha_max - 1) / alpha_gain, the stretch over which alpha rises
    from 1 to alpha_max (:func:`split_range`). E.g. T in [0.6, 1.5], alpha_gain 4, alpha_max 3:
    (0.1, 2.0).
    """
    if alpha_gain <= 0:
        return float(t_min), float(t_max)
    reach = (float(alpha_max) - 1.0) / float(alpha_gain)
    return float(t_min) - reach, float(t_max) + reach


def integral_range(
    t_min: float, t_max: float, alpha_gain: float, alpha_max: float, past_t_max: bool = False
) -> tuple[float, float]:
    """The adaptive controller's integral range (lo, hi), in temperature units.

    Args:
        t_min, t_max: T's clamps.
        alpha_gain, alpha_max: the second actuator (:func:`output_range`).
        past_t_max: let the integral carry past t_max into alpha's range (needs alpha_gain > 0).
    Returns:
        (t_min, t_max) by default: the integral is T's balance point. With past_t_max, (t_min, the
        output range's top), e.g. T in [0.6, 1.3], alpha_gain 4, alpha_max 3: (0.6, 1.8).

    Why upwards only: with the integral held at t_max, a balance that needs more push than T = t_max
    gives leaves a steady offset that only the proportional part answers (measured on the CPU at
    0.08: seed 0 kept a mean of 0.074, docs/results.md). Downwards the integral stays at t_min: left
    free there it ran down to 0.30 while a run came from 0.15 to 0.08, and T then sat at its minimum
    while entropy undershot (docs/architecture.md, "The controller"). Measured with past_t_max at 0.08
    on the CPU (T's clamp 1.3, 4 seeds): the offset went, but the longer-lived push past T's clamp
    made the slow swings larger (10.1-17.6% against 8.1-12.2% without), so it is off by default.
    """
    if not past_t_max:
        return float(t_min), float(t_max)
    if alpha_gain <= 0:
        raise ValueError("past_t_max carries the integral into alpha's range: it needs alpha_gain > 0")
    return float(t_min), output_range(t_min, t_max, alpha_gain, alpha_max)[1]


def split_range(output: float, t_min: float, t_max: float, alpha_gain: float) -> tuple[float, float]:
    """Split the adaptive controller's output u between its two actuators: (T, alpha scale).

    Args:
        output: u, in temperature units, inside :func:`output_range`.
        t_min, t_max: T's clamps.
        alpha_gain: the alpha scale's rise per unit of u beyond a clamp (0: T only).
    Returns:
        T = clip(u, t_min, t_max) and s = 1 + alpha_gain * |u - T|: inside T's range alpha is left as
        configured (s = 1); past t_max the tempered positives' push *up* is made s times stronger,
        past t_min their push *down* (at t_min the regulariser sharpens: the entropy-push
        table, docs/results.md). Split range (two actuators in sequence): T first, since it moves entropy
        without changing the loss's scale, alpha only once T is spent. By default the integral stays
        within T's clamps, so alpha answers the proportional and derivative parts only;
        :func:`integral_range` says why, and when it may carry past t_max.
    """
    temperature = min(max(float(output), float(t_min)), float(t_max))
    return temperature, 1.0 + float(alpha_gain) * abs(float(output) - temperature)


class Action(NamedTuple):
    """What the controller sets for one step.

    temperature: the regulariser batch's sampling temperature.
    alpha: the REINFORCE rows' weight in combine "add" (None: algorithm.alpha, as configured).
    output: the adaptive controller's output u in temperature units (None for the other
        controllers); equal to the temperature unless the second actuator (alpha) is in use.
    """

    temperature: float
    alpha: float | None = None
    output: float | None = None


def controller_action(state: ControllerState, algo_cfg: AlgorithmConfig) -> Action:
    """The regulariser's temperature (and, for the adaptive controller, alpha) for this step.

    controller "bang_bang": :func:`choose_temperature` on state.h_prev; "fixed" (ablation): always
    algo_cfg.fixed_temperature; "adaptive": :func:`adaptive_output` of the integral state
    state.adaptive_t (moved by :func:`adaptive_integral` after each measurement), the last
    measurement (or, with algo_cfg.adaptive_proportional_smoothed, the smoothed reading
    state.adaptive_h_smooth) and the smoothed reading's slope, within :func:`output_range`, split by
    :func:`split_range` into T and alpha = algo_cfg.alpha * s; adaptive_t_init before the first
    measurement (state.step == 0).
    """
    c = algo_cfg
    if c.controller == "fixed":
        return Action(float(c.fixed_temperature))
    if c.controller == "adaptive":
        lo, hi = output_range(c.adaptive_t_min, c.adaptive_t_max, c.adaptive_alpha_gain, c.adaptive_alpha_max)
        if state.step == 0 or state.adaptive_t is None:  # nothing measured yet: no error to act on
            u = float(c.adaptive_t_init)
        else:
            # the proportional term passes the reading's noise (6-8% of H* at 32 x 8 rows) into T;
            # the smoothed reading trades some of it for lag (adaptive_smoothing)
            smoothed = c.adaptive_proportional_smoothed and state.adaptive_h_smooth is not None
            h = state.adaptive_h_smooth if smoothed else state.h_prev
            u = adaptive_output(state.adaptive_t, h, c.target_entropy, c.adaptive_kp, lo, hi,
                                slope=state.adaptive_slope, kd=c.adaptive_kd, kp_above=c.adaptive_kp_above)
        temperature, scale = split_range(u, c.adaptive_t_min, c.adaptive_t_max, c.adaptive_alpha_gain)
        return Action(temperature, float(c.alpha) * scale, u)
    return Action(choose_temperature(state.h_prev, c.target_entropy, c.t_high, c.t_low))


def select_positive_samples(tempered_advantages: Tensor, threshold: float = 0.05) -> Tensor:
    """Indices of the regulariser rows whose advantage exceeds the threshold.

    Args:
        tempered_advantages: [M] GRPO advantages A_T of the rows sampled at temperature T.
        threshold: strict lower bound (0.05): correct answers from groups that are not all-correct.
    Returns:
        [P] long indices in ascending order (P may be 0).
    """
    return torch.nonzero(tempered_advantages > threshold, as_tuple=False).flatten()


def select_correct_samples(rewards: Tensor, threshold: float = 0.5) -> Tensor:
    """Indices of the regulariser rows whose reward exceeds the threshold (regulariser_samples "correct").

    Unlike :func:`select_positive_samples` this keeps the correct rows of all-correct groups (A_T = 0),
    which are most rows of an accurate policy sampled at a low temperature.

    Args:
        rewards: [M] rewards of the rows sampled at temperature T (0 / 1 from the verifiers).
        threshold: strict lower bound (0.5: correct).
    Returns:
        [P] long indices in ascending order (P may be 0).
    """
    return torch.nonzero(rewards > threshold, as_tuple=False).flatten()


def reinforce_count(num_positives: int, K: int, h_prev: float, target: float, halve: bool = True) -> int:
    """k = min(K, |POS|), then k // 2 when h_prev > target and halving is on; 0 when POS is empty."""
    k = min(int(K), int(num_positives))
    if halve and h_prev > target:
        k //= 2
    return max(k, 0)


def assemble_batch(
    policy_batch: SequenceBatch,
    regulariser_batch: SequenceBatch | None,
    positive_indices: Tensor,
    k: int,
    combine: Combine = "replace",
    alpha: float = 1.0,
) -> SequenceBatch:
    """The update batch X: the first k positive regulariser rows, then the policy rows.

    Args:
        policy_batch: B rows with ``advantages`` [B, L] set (the GRPO rows).
        regulariser_batch: M rows sampled at temperature T (or None when k == 0).
        positive_indices: [P] rows of regulariser_batch with A_T > threshold.
        k: REINFORCE rows to use (<= P).
        combine: "replace": X = POS[:k] + B[k:], |X| == |B| (reference code; k is capped at |B|);
            "add": X = POS[:k] + B, the REINFORCE rows' loss weighted by alpha (paper's formula).
        alpha: weight of the REINFORCE rows in "add" mode (ignored by "replace": weight 1).
    Returns:
        SequenceBatch [k + B (- k), L'] with roles ("reinforce" rows first), advantages (+1.0 on
        every response token of a REINFORCE row), weights, temperatures and source_index
        (index into the regulariser batch for REINFORCE rows, into the policy batch otherwise).
    """
    if policy_batch.advantages is None:
        raise ValueError("policy_batch needs advantages before assembly")
    if k > len(positive_indices):
        raise ValueError(f"k = {k} exceeds the {len(positive_indices)} positive samples")
    if combine == "replace":
        k = min(k, len(policy_batch))
    elif combine != "add":
        raise ValueError(f"unknown combine mode {combine!r}")
    policy_rows = policy_batch.with_fields(roles=[ROLE_POLICY] * len(policy_batch))
    if k == 0 or regulariser_batch is None:
        if k > 0:
            raise ValueError("k > 0 needs a regulariser batch")
        return policy_rows
    chosen = regulariser_batch.select(positive_indices[:k].cpu())
    reinforce_rows = chosen.with_fields(
        roles=[ROLE_REINFORCE] * k,
        # plain REINFORCE with reward 1: advantage +1.0 on every response token
        advantages=chosen.response_mask.float().clone(),
        weights=torch.full((k,), float(alpha) if combine == "add" else 1.0, device=chosen.weights.device),
    )
    if combine == "replace":
        kept = policy_rows.select(range(k, len(policy_rows)))
        return SequenceBatch.concat([reinforce_rows, kept]) if len(kept) else reinforce_rows
    return SequenceBatch.concat([reinforce_rows, policy_rows])
