"""The algorithms, registered by name: what each one adds to the generic PPO epoch.

    algo = make_algorithm(cfg.algorithm)            # algorithm.name -> one small object
    decision = algo.decide(algo.initial_state())    # the controller's decision for iteration 0

The pipeline asks the object, never the name (verl's ``core_algos`` registries are the model):

- rollout: ``algo.regulariser_temperature(decision)`` -- sample a regulariser batch at that
  temperature (None: no regulariser batch);
- update (:func:`aepo_core.core.update.update_step`, the generic loop): ``prepare_batch`` (advantages,
  and for AEPO the positives, k and the assembled batch), ``needs_old_entropy`` and
  ``shape_advantages`` (per-token advantage shaping), ``token_loss`` (the per-token policy loss:
  PPO's clip, or Clip-Cov / KL-Cov), ``bonus_coef`` (an entropy bonus term);
- entropy stage (it owns the controller): ``next_state`` moves the controller state with what the
  update measured (``entropy_metric``: which entropy it reads), ``decide`` turns it into the next
  iteration's :class:`Decision`, written to ``controller.json`` and read by the next rollout and
  update, never recomputed; ``reachability_message`` says when the target is out of the
  actuator's reach.

A new algorithm is one subclass with ``@register("name")`` plus its config keys
(``AlgorithmConfig``); see docs/architecture.md, "Where to change what".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from aepo_core.config import AlgorithmConfig
from aepo_core.core.advantages import broadcast_to_tokens, group_advantages
from aepo_core.core.aepo import (
    ControllerState,
    adaptive_integral,
    assemble_batch,
    clamp_side,
    controller_action,
    integral_range,
    output_range,
    select_correct_samples,
    select_positive_samples,
    smoothed_slope,
)
from aepo_core.core.baselines import (
    clip_cov_selection,
    entropy_shaped_advantages,
    kl_cov_penalty,
    kl_cov_selection,
    token_covariance,
    update_entropy_coef,
)
from aepo_core.core.batch import SequenceBatch
from aepo_core.core.losses import clipped_token_loss


@dataclass(frozen=True)
class Decision:
    """The controller's decision for one iteration, made once by the entropy stage.

    temperature: the regulariser batch's sampling temperature (None: no regulariser batch).
    k_cap: the most REINFORCE rows the update may use (K, or K // 2 when halved; 0 without one).
    halve_k: k = min(K, |POS|) // 2 instead of min(K, |POS|) (aepo-algorithm.md: halved above H*).
    state: the controller state the decision was made from (h_prev, entropy coefficient, ...).
    alpha: the REINFORCE rows' weight in combine "add" (None: algorithm.alpha; the adaptive
        controller's second actuator sets it, :func:`aepo_core.core.aepo.split_range`).
    output: the adaptive controller's output u in temperature units (None for the others): what the
        reachability warning compares with its output range.
    """

    temperature: float | None
    k_cap: int
    halve_k: bool
    state: ControllerState
    alpha: float | None = None
    output: float | None = None

    def actuator(self) -> float | None:
        """Where the step's actuator stood, in temperature units: the adaptive controller's output u,
        else the temperature (other controllers, and decisions written before u was recorded)."""
        return self.output if self.output is not None else self.temperature


@dataclass
class PreparedBatch:
    """What :meth:`Algorithm.prepare_batch` returns: the batch X to train on, and what it chose."""

    batch: SequenceBatch
    num_positives: int = 0
    k: int = 0
    info: dict[str, float] = field(default_factory=dict)


REGISTRY: dict[str, type[Algorithm]] = {}


def register(name: str):
    """Class decorator: ``algorithm.name == name`` selects this class."""

    def wrap(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def make_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    """The algorithm object for ``cfg.name``; ValueError naming the known ones otherwise."""
    if cfg.name not in REGISTRY:
        raise ValueError(f"unknown algorithm.name {cfg.name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[cfg.name](cfg)


class Algorithm:
    """Plain GRPO; every method is a hook the subclasses override. ``cfg``: the algorithm section."""

    name: ClassVar[str] = "grpo"
    needs_old_entropy: ClassVar[bool] = False  # shape_advantages reads pi_old's per-token entropy
    steers_to_target: ClassVar[bool] = False  # algorithm.target_entropy is this algorithm's set point

    def __init__(self, cfg: AlgorithmConfig) -> None:
        self.cfg = cfg

    def target(self) -> float | None:
        """The entropy this algorithm steers to (None: it has no target)."""
        return self.cfg.target_entropy if self.steers_to_target else None

    def run_name(self) -> str:
        """The first part of a default run directory name."""
        return self.name

    # ---------------------------------------------------------------- the controller
    def initial_state(self) -> ControllerState:
        """The controller state before the first step."""
        return ControllerState.initial(self.cfg)

    def entropy_metric(self) -> str:
        """The update metric the controller reads as h_prev: ``entropy/<estimator>`` over every row
        (entropy_rows "all", the reference code) or ``entropy/<estimator>_policy_rows`` over the rows
        sampled at rollout.temperature only ("policy", the default; the two are equal without
        REINFORCE rows). Both are measured at T = 1 by the update (core/update.py ``_StepMeter``)."""
        suffix = "_policy_rows" if self.cfg.entropy_rows == "policy" else ""
        return f"entropy/{self.cfg.entropy_estimator}{suffix}"

    def control_metric(self) -> str:
        """The update metric the controller reads as h_prev: :meth:`entropy_metric`, or with
        ``algorithm.entropy_lookahead`` the same rows' entropy where AdamW's momentum will carry the
        policy (``..._ahead``, core/update.py ``entropy_ahead``). The target is stated in
        :meth:`entropy_metric` either way."""
        return self.entropy_metric() + ("_ahead" if self.cfg.entropy_lookahead else "")

    def next_state(self, state: ControllerState, decision: Decision, metrics: dict[str, float]) -> ControllerState:
        """The state after an update that ran under ``decision`` and measured ``metrics``.

        h_prev is :meth:`control_metric` of that update (unchanged when it measured nothing, e.g.
        no policy-row token); temperature is the one the decision sampled at (float32, as the
        rollout stored it).
        """
        measured = metrics.get(self.control_metric(), state.h_prev)
        temperature = decision.temperature
        if temperature is not None:
            temperature = float(torch.tensor(temperature, dtype=torch.float32))
        return replace(
            state,
            h_prev=float(measured),
            temperature=temperature,
            k=int(metrics.get("aepo/k", 0)),
            num_positives=int(metrics.get("aepo/num_positives", 0)),
            step=state.step + 1,
        )

    def decide(self, state: ControllerState) -> Decision:
        """The next iteration's decision from the controller state (GRPO: nothing to decide)."""
        return Decision(temperature=None, k_cap=0, halve_k=False, state=state)

    def reachability_message(self, state: ControllerState, entropy_ceiling: float | None = None) -> str | None:
        """One line when the target has been out of the actuator's reach for algorithm.reach_window
        steps, else None (GRPO: no actuator, never)."""
        return None

    def regulariser_temperature(self, decision: Decision) -> float | None:
        """The rollout's regulariser temperature (None: sample no regulariser batch)."""
        return decision.temperature

    # ---------------------------------------------------------------- the update
    def prepare_batch(
        self,
        policy_batch: SequenceBatch,
        regulariser_batch: SequenceBatch | None,
        decision: Decision,
        group_size: int,
        regulariser_group_size: int | None = None,
    ) -> PreparedBatch:
        """GRPO advantages of the policy batch ([B] -> per token), no regulariser rows."""
        if regulariser_batch is not None:
            raise ValueError(f"algorithm {self.name!r} does not use a regulariser batch")
        adv = group_advantages(policy_batch.rewards, group_size, self.cfg.advantage_scaling)
        rows = policy_batch.with_fields(advantages=broadcast_to_tokens(adv, policy_batch.response_mask))
        info = {"advantage/mean": adv.mean().item(), "advantage/abs_mean": adv.abs().mean().item()}
        return PreparedBatch(batch=assemble_batch(rows, None, torch.zeros(0, dtype=torch.long), 0), info=info)

    def shape_advantages(self, advantages: Tensor, old_entropy: Tensor | None) -> Tensor:
        """Per-token advantage shaping, [B, L] -> [B, L] (GRPO: none)."""
        return advantages

    def token_loss(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token policy loss [b, L] and its indicators (ratio, clip masks): PPO's clipped loss."""
        c = self.cfg
        return clipped_token_loss(logp, old_logp, advantages, c.clip_low, c.clip_high, c.dual_clip)

    def bonus_coef(self, decision: Decision) -> float:
        """Coefficient of the entropy bonus -c * H in the loss (0: no bonus term)."""
        return 0.0


@register("grpo")
class GRPO(Algorithm):
    """Group-relative advantages and PPO's clipped loss (the base class, as it is)."""


@register("aepo")
class AEPO(Algorithm):
    """AEPO: REINFORCE on the positives of a batch sampled at the controller's temperature.

    Controller (aepo-algorithm.md): ``bang_bang`` T_high iff h_prev <= H* else T_low (the paper's
    reference controller), ``fixed`` (ablation), or ``adaptive`` (PI action on T within
    [adaptive_t_min, adaptive_t_max], :func:`aepo_core.core.aepo.adaptive_output`, and on alpha past
    those clamps when adaptive_alpha_gain > 0, :func:`aepo_core.core.aepo.split_range`).
    k = min(K, |POS|), halved when h_prev > H* (``halve_above_target``; never under ``adaptive``:
    halving is bang-bang's asymmetry, the adaptive controller weakens its push through T).
    """

    steers_to_target = True

    def run_name(self) -> str:
        return f"{self.name}-h{self.cfg.target_entropy:g}"

    def clamps(self) -> tuple[float, float] | None:
        """The actuator's (lowest, highest) temperature: (t_low, t_high) for bang_bang, the adaptive
        clamps for adaptive, None for fixed (no actuator: nothing can be out of its reach)."""
        c = self.cfg
        if c.controller == "bang_bang":
            return float(c.t_low), float(c.t_high)
        if c.controller == "adaptive":
            return float(c.adaptive_t_min), float(c.adaptive_t_max)
        return None

    def output_range(self) -> tuple[float, float] | None:
        """The controller output's (lowest, highest): the clamps, or for the adaptive controller with
        its second actuator the wider range that reaches alpha's maximum past them."""
        c = self.cfg
        if c.controller == "adaptive":
            return output_range(c.adaptive_t_min, c.adaptive_t_max, c.adaptive_alpha_gain, c.adaptive_alpha_max)
        return self.clamps()

    def next_state(self, state, decision, metrics):
        new = super().next_state(state, decision, metrics)
        c = self.cfg
        if c.controller == "adaptive" and self.control_metric() in metrics:
            # integrate the measured error (no measurement: no integration); where the measured step's
            # actuator stood decides whether the integrator is held at a clamp (anti-windup). The
            # integral is T's balance point, within T's clamps, unless adaptive_integral_past_t_max lets
            # it carry into alpha's range; the held-at-a-clamp test then reads the output u, which is
            # where the actuator stands in that range.
            lo, hi = integral_range(c.adaptive_t_min, c.adaptive_t_max, c.adaptive_alpha_gain,
                                    c.adaptive_alpha_max, c.adaptive_integral_past_t_max)
            integral = state.adaptive_t if state.adaptive_t is not None else c.adaptive_t_init
            stood = decision.actuator() if c.adaptive_integral_past_t_max else decision.temperature
            sampled = stood if stood is not None else c.adaptive_t_init
            smooth, slope = smoothed_slope(state.adaptive_h_smooth, new.h_prev, c.adaptive_smoothing)
            # the integral reads the policy's own entropy, the reading the target is stated in, even when
            # the proportional term reads ahead (entropy_lookahead): ahead - now has a mean of its own
            # that later gradients do not carry out (a Smith predictor's model error), and an integral
            # on the reading ahead held that, not the policy, at the target (docs/results.md)
            held = metrics.get(self.entropy_metric(), new.h_prev)
            new = replace(new, adaptive_t=adaptive_integral(
                integral, sampled, float(held), c.target_entropy, c.adaptive_gain, lo, hi,
                slope=slope, hold_while_closing=c.adaptive_hold_while_closing,
            ), adaptive_h_smooth=smooth, adaptive_slope=slope)
        span = self.output_range()
        if span is None:
            return replace(new, at_clamp_iterations=0, clamp_side=None)
        # bang-bang raises T at h == H* (its tie rule), so an equal reading counts as "still below" there
        return reachability(new, decision, c.target_entropy, *span, tie_is_below=c.controller == "bang_bang")

    def decide(self, state: ControllerState) -> Decision:
        c = self.cfg
        action = controller_action(state, c)
        halve = c.controller != "adaptive" and c.halve_above_target and state.h_prev > c.target_entropy
        k_cap = c.reinforce_sample_num // 2 if halve else c.reinforce_sample_num
        return Decision(temperature=action.temperature, k_cap=k_cap, halve_k=halve, state=state,
                        alpha=action.alpha, output=action.output)

    def reachability_message(self, state, entropy_ceiling=None):
        clamps = self.clamps()
        if clamps is None:
            return None
        c = self.cfg
        alpha_max = c.alpha * c.adaptive_alpha_max if c.controller == "adaptive" and c.adaptive_alpha_gain > 0 else None
        return reachability_message(
            state, c.target_entropy, c.entropy_estimator, c.entropy_rows, *clamps, c.reach_window, entropy_ceiling,
            alpha_max=alpha_max, ahead=c.entropy_lookahead,
        )

    def regulariser_candidates(self, rewards: Tensor, group_size: int) -> Tensor:
        """Indices of the regulariser rows the REINFORCE term may train, in prompt order: the update
        trains the first k of them, k = min(K, their number) (halved above H* under bang-bang).

        Args:
            rewards: [M] rewards of the regulariser batch (groups of group_size consecutive rows).
            group_size: n of the regulariser batch.
        Returns:
            [|POS|] int64 indices, ascending. ``regulariser_samples``: positives (A_T > threshold,
            the reference), correct (reward > correct_threshold) or all (every row).

        A group's candidates depend on that group only, so once the first K are known the later
        prompts cannot change the selection (the rollout stops sampling there: `stages.rollout`).
        """
        c = self.cfg
        if c.regulariser_samples == "all":
            # reward-agnostic tempered REINFORCE (a deviation): every row is a candidate, prompt order
            return torch.arange(len(rewards))
        if c.regulariser_samples == "correct":
            return select_correct_samples(rewards, c.correct_threshold)
        return select_positive_samples(group_advantages(rewards, group_size, c.advantage_scaling), c.positive_threshold)

    def prepare_batch(self, policy_batch, regulariser_batch, decision, group_size, regulariser_group_size=None):
        prepared = super().prepare_batch(policy_batch, None, decision, group_size)
        if regulariser_batch is None or len(regulariser_batch) == 0:
            return prepared
        c = self.cfg
        positives = self.regulariser_candidates(regulariser_batch.rewards, regulariser_group_size or group_size)
        k = min(int(c.reinforce_sample_num), len(positives))
        if decision.halve_k:
            k //= 2
        if c.combine == "replace":
            k = min(k, len(policy_batch))
        policy_rows = prepared.batch
        alpha = decision.alpha if decision.alpha is not None else c.alpha  # the controller's, when it sets it
        batch = assemble_batch(policy_rows, regulariser_batch, positives, k, c.combine, alpha)
        prepared.info["aepo/regulariser_reward_mean"] = regulariser_batch.rewards.float().mean().item()
        return PreparedBatch(batch=batch, num_positives=len(positives), k=k, info=prepared.info)


@register("entropy_reg")
class EntropyBonus(Algorithm):
    """GRPO with a fixed entropy bonus: loss - entropy_coef * H."""

    def bonus_coef(self, decision: Decision) -> float:
        return float(self.cfg.entropy_coef)


@register("adaptive_entropy")
class AdaptiveEntropyBonus(Algorithm):
    """GRPO with an entropy bonus whose coefficient moves by adaptive_delta toward the target."""

    steers_to_target = True

    def next_state(self, state, decision, metrics):
        new = super().next_state(state, decision, metrics)
        coef = update_entropy_coef(state.entropy_coef, new.h_prev, self.cfg.target_entropy, self.cfg.adaptive_delta)
        return replace(new, entropy_coef=coef)

    def bonus_coef(self, decision: Decision) -> float:
        return float(decision.state.entropy_coef)


@register("entropy_adv")
class EntropyAdvantage(Algorithm):
    """Entropy-shaped advantages (Cheng et al.): A + min(alpha * H_old, |A| / kappa) per token."""

    needs_old_entropy = True

    def shape_advantages(self, advantages, old_entropy):
        return entropy_shaped_advantages(advantages, old_entropy, self.cfg.entropy_adv_alpha, self.cfg.entropy_adv_kappa)


@register("clip_cov")
class ClipCov(Algorithm):
    """Clip-Cov (Cui et al., arXiv 2505.22617): PPO's loss with the gradient of a random
    ``cov_fraction`` of the tokens whose covariance lies in (cov_low, cov_high) detached (tokens
    PPO's clip already stops are not candidates). Selection is per micro-batch (as in verl)."""

    def token_loss(self, logp, old_logp, advantages, mask):
        loss, ind = super().token_loss(logp, old_logp, advantages, mask)
        cov = token_covariance(logp, advantages, mask)
        clipped = ind["clipped_low"] | ind["clipped_high"]
        c = self.cfg
        detached = clip_cov_selection(cov, mask, clipped, c.cov_fraction, c.cov_low, c.cov_high)
        ind["cov_selected"] = detached
        return loss * (~detached).to(loss.dtype), ind


@register("kl_cov")
class KLCov(Algorithm):
    """KL-Cov (Cui et al., arXiv 2505.22617): PPO's loss plus kl_cov_coef * |log pi - log pi_old|
    on the top ``cov_fraction`` of the tokens by covariance. Selection is per micro-batch (as in verl)."""

    def token_loss(self, logp, old_logp, advantages, mask):
        loss, ind = super().token_loss(logp, old_logp, advantages, mask)
        selected = kl_cov_selection(token_covariance(logp, advantages, mask), mask, self.cfg.cov_fraction)
        ind["cov_selected"] = selected
        return loss + kl_cov_penalty(logp, old_logp, selected, self.cfg.kl_cov_coef), ind


def reachability(
    state: ControllerState,
    decision: Decision,
    target: float,
    t_min: float,
    t_max: float,
    tie_is_below: bool = False,
) -> ControllerState:
    """Move the at-clamp counter after a step that ran under ``decision`` and measured state.h_prev.

    The step counts as "at its clamp, error keeping its sign" when it sampled at t_max and the
    entropy is still below the target (the most the actuator can do did not raise it enough), or
    at t_min and still above. Consecutive such steps on the same side add up; any other step resets
    the counter to 0. Under bang-bang the clamps are (t_low, t_high), so T_high chosen N times in a
    row with h <= H* counts N (``tie_is_below``: h == H* counts as below, bang-bang's tie rule).

    Args:
        state: the state after the step (h_prev: what the step measured).
        decision: the decision the step ran under (:meth:`Decision.actuator`: where its actuator stood).
        target: H*, in h_prev's units.
        t_min, t_max: the actuator's clamps (temperatures, or the adaptive controller's output range;
            compared with a 1e-6 relative tolerance).
    Returns:
        ``state`` with at_clamp_iterations and clamp_side moved (pure; the state is persisted in
        controller.json, so the count survives a resume).
    """
    below = state.h_prev <= target if tie_is_below else state.h_prev < target
    side = clamp_side(decision.actuator(), below, state.h_prev > target, t_min, t_max)
    if side is None:
        return replace(state, at_clamp_iterations=0, clamp_side=None)
    count = state.at_clamp_iterations + 1 if state.clamp_side == side else 1
    return replace(state, at_clamp_iterations=count, clamp_side=side)


def reachability_message(
    state: ControllerState,
    target: float,
    estimator: str,
    rows: str,
    t_min: float,
    t_max: float,
    window: int,
    entropy_ceiling: float | None = None,
    alpha_max: float | None = None,
    ahead: bool = False,
) -> str | None:
    """The plain sentence the entropy stage shows while the target is out of reach, else None.

    E.g. "target 0.30 not reached: entropy 0.18 (nll, policy rows), T at its maximum 1.5 for 10
    iterations; a uniformly random valid answer has 0.25 nats/token".

    Args:
        state: after :func:`reachability` (at_clamp_iterations, clamp_side, h_prev).
        target, estimator, rows: H* and what the controller reads (for the sentence).
        t_min, t_max: the clamps; window: steps at a clamp before it is said (algorithm.reach_window).
        entropy_ceiling: an upper reference for the entropy in nats/token (the entropy of a uniform
            policy over the valid answers) where the task knows it; named only on the "max" side,
            where it tells whether the target is above what any sensible policy reaches.
        alpha_max: alpha's highest value when the controller's second actuator is on (then the
            clamp is reached only with T at its clamp *and* alpha at this value), else None.
        ahead: the controller reads ahead (algorithm.entropy_lookahead): the entropy named is the
            one the optimiser's momentum will carry the policy to, and the sentence says so.
    """
    if state.clamp_side is None or state.at_clamp_iterations < window:
        return None
    word, bound = ("maximum", t_max) if state.clamp_side == "max" else ("minimum", t_min)
    text = (
        f"target {target:.2f} not reached: entropy {state.h_prev:.2f} ({estimator}, {rows} rows"
        f"{', read ahead' if ahead else ''}), "
        f"T at its {word} {bound:g}" + (f" and alpha at {alpha_max:g}" if alpha_max is not None else "")
        + f" for {state.at_clamp_iterations} iterations"
    )
    if entropy_ceiling is not None and state.clamp_side == "max":
        text += f"; a uniformly random valid answer has {entropy_ceiling:.2f} nats/token"
    return text


def decision_to_json(decision: Decision, estimator: str, measured: dict[str, Any], target: float) -> dict[str, Any]:
    """controller.json's content: the one record of the decision (see :func:`decision_from_json`)."""
    return {
        "estimator": estimator,
        "measured": measured,
        "target": target,
        "next_temperature": decision.temperature,
        "next_k_cap": decision.k_cap,
        "state": decision.state.to_dict(),
        "next_k_halved": decision.halve_k,
        "next_alpha": decision.alpha,
        "next_output": decision.output,
    }


def decision_from_json(data: dict[str, Any]) -> Decision:
    """Inverse of :func:`decision_to_json`."""
    return Decision(
        temperature=data["next_temperature"],
        k_cap=int(data["next_k_cap"]),
        halve_k=bool(data["next_k_halved"]),
        state=ControllerState.from_dict(data["state"]),
        alpha=data.get("next_alpha"),  # absent in controller.json files written before it existed
        output=data.get("next_output"),
    )
