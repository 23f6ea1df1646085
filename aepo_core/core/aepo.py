"""AEPO's regulariser: the temperature controller, the positive samples, and batch assembly.

One step (aepo-algorithm.md):
  T   = T_high if H_prev <= H* else T_low                     (bang-bang controller; or "adaptive":
                                                                integral action on T, adaptive_temperature)
  POS = rows of the regulariser batch B_T with A_T > threshold
  k   = min(K, |POS|), halved (k // 2) when H_prev > H*      (weaker push downwards)
  X   = POS[:k] + B[k:]  ("replace", the reference code)  or  POS[:k] + B  ("add", paper's alpha)
Every token of a REINFORCE row gets advantage +1.0. The REINFORCE rows come first so an in-order
split puts them in the first, exactly on-policy mini-batch, where the clip is inactive and their
gradient is plain REINFORCE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

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
    adaptive_t: the adaptive controller's temperature for the next step: its whole state (integral
        action on T itself, so no separate accumulator can wind up); None for the other controllers
        and before the first measurement (then algorithm.adaptive_t_init). Full precision, unlike
        ``temperature`` (float32, as the rollout stored it), so the integration does not drift.
    at_clamp_iterations: consecutive steps the actuator sat at a clamp with the error keeping its
        sign (aepo_core.core.algorithms.reachability); 0 when it is not at a clamp.
    clamp_side: "max" (T at its maximum, entropy still below H*) or "min" (T at its minimum,
        entropy still above H*) while at_clamp_iterations > 0, else None.

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


def adaptive_temperature(
    temperature: float, h: float, target: float, gain: float, t_min: float, t_max: float
) -> float:
    """One step of the adaptive controller: integral action on the regulariser temperature.

        e      = (H* - h) / H*                          relative error (> 0: entropy too low, raise T)
        T_next = clip(T + gain * e, t_min, t_max)

    Args:
        temperature: T, the temperature the step that measured ``h`` sampled at.
        h: the entropy that step measured (nats/token, the controller's estimator and rows).
        target: H* > 0, same units.
        gain: temperature change per iteration per unit of relative error (0.25: h = H*/2 raises T
            by 0.125 per iteration); relative, so one gain serves targets of any size.
        t_min, t_max: the clamps.
    Returns:
        T_next in [t_min, t_max].

    Anti-windup: T is the integrator's whole state and is clamped, so it never holds more than the
    clamp; and an error that pushes further into a clamp is not integrated (conditional
    integration), so after any number of steps at t_max one step of opposite error moves T off it
    at once. Why integral and not bang-bang: a steady error keeps moving T until it is gone, and T
    settles where the REINFORCE push balances GRPO's collapse instead of switching between two
    extremes every step.
    """
    error = (target - h) / target
    if (temperature >= t_max and error > 0) or (temperature <= t_min and error < 0):
        return float(min(max(temperature, t_min), t_max))  # at a clamp, pushed outwards: hold
    return float(min(max(temperature + gain * error, t_min), t_max))


def controller_temperature(state: ControllerState, algo_cfg: AlgorithmConfig) -> float:
    """The temperature to sample the regulariser batch at this step.

    controller "bang_bang": :func:`choose_temperature` on state.h_prev; "fixed" (ablation): always
    algo_cfg.fixed_temperature; "adaptive": state.adaptive_t (moved by :func:`adaptive_temperature`
    after each measurement), adaptive_t_init before the first one (state.step == 0).
    """
    if algo_cfg.controller == "fixed":
        return float(algo_cfg.fixed_temperature)
    if algo_cfg.controller == "adaptive":
        if state.step == 0 or state.adaptive_t is None:
            return float(algo_cfg.adaptive_t_init)
        return float(state.adaptive_t)
    return choose_temperature(state.h_prev, algo_cfg.target_entropy, algo_cfg.t_high, algo_cfg.t_low)


def select_positive_samples(tempered_advantages: Tensor, threshold: float = 0.05) -> Tensor:
    """Indices of the regulariser rows whose advantage exceeds the threshold.

    Args:
        tempered_advantages: [M] GRPO advantages A_T of the rows sampled at temperature T.
        threshold: strict lower bound (0.05): correct answers from groups that are not all-correct.
    Returns:
        [P] long indices in ascending order (P may be 0).
    """
    return torch.nonzero(tempered_advantages > threshold, as_tuple=False).flatten()


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
