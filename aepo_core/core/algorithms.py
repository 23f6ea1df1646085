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
  update measured, ``decide`` turns it into the next iteration's :class:`Decision`, written to
  ``controller.json`` and read by the next rollout and update, never recomputed.

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
    assemble_batch,
    choose_temperature,
    select_positive_samples,
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
    """

    temperature: float | None
    k_cap: int
    halve_k: bool
    state: ControllerState


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

    def next_state(self, state: ControllerState, decision: Decision, metrics: dict[str, float]) -> ControllerState:
        """The state after an update that ran under ``decision`` and measured ``metrics``.

        h_prev is the configured estimator's entropy of that update (unchanged when it measured
        nothing); temperature is the one the decision sampled at (float32, as the rollout stored it).
        """
        measured = metrics.get(f"entropy/{self.cfg.entropy_estimator}", state.h_prev)
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

    Controller (aepo-algorithm.md): ``bang_bang`` T_high iff h_prev <= H* else T_low, or ``fixed``
    (ablation). k = min(K, |POS|), halved when h_prev > H* (``halve_above_target``).
    """

    steers_to_target = True

    def run_name(self) -> str:
        return f"{self.name}-h{self.cfg.target_entropy:g}"

    def decide(self, state: ControllerState) -> Decision:
        c = self.cfg
        if c.controller == "fixed":
            temperature = float(c.fixed_temperature)
        else:
            temperature = choose_temperature(state.h_prev, c.target_entropy, c.t_high, c.t_low)
        halve = c.halve_above_target and state.h_prev > c.target_entropy
        k_cap = c.reinforce_sample_num // 2 if halve else c.reinforce_sample_num
        return Decision(temperature=temperature, k_cap=k_cap, halve_k=halve, state=state)

    def prepare_batch(self, policy_batch, regulariser_batch, decision, group_size, regulariser_group_size=None):
        prepared = super().prepare_batch(policy_batch, None, decision, group_size)
        if regulariser_batch is None or len(regulariser_batch) == 0:
            return prepared
        c = self.cfg
        adv_t = group_advantages(regulariser_batch.rewards, regulariser_group_size or group_size, c.advantage_scaling)
        positives = select_positive_samples(adv_t, c.positive_threshold)
        k = min(int(c.reinforce_sample_num), len(positives))
        if decision.halve_k:
            k //= 2
        if c.combine == "replace":
            k = min(k, len(policy_batch))
        policy_rows = prepared.batch
        batch = assemble_batch(policy_rows, regulariser_batch, positives, k, c.combine, c.alpha)
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
    }


def decision_from_json(data: dict[str, Any]) -> Decision:
    """Inverse of :func:`decision_to_json`."""
    return Decision(
        temperature=data["next_temperature"],
        k_cap=int(data["next_k_cap"]),
        halve_k=bool(data["next_k_halved"]),
        state=ControllerState.from_dict(data["state"]),
    )
