"""Sweep plans: which runs a sweep trains.

A plan file (YAML) names arms, each a list of config overrides, optionally with its own seeds:

    seeds: [0]                      # default seeds of every arm
    overrides: [rollout.n=8]        # shared by every arm (before the arm's own)
    arms:
      grpo: {overrides: [algorithm.name=grpo], seeds: [0, 1]}
      aepo-0.12: [algorithm.target_entropy=0.12]

Every (arm, seed) is one run named `<arm>-s<seed>`, with rollout.seed and trainer.seed set to the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from aepo_core.errors import UserError


class PlanError(UserError):
    """A sweep plan that cannot be read or is malformed (the message names the file and key)."""


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: tuple[str, ...]


def _str_list(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise PlanError(f"{where}: expected a list of overrides like ['algorithm.name=grpo']")
    return [str(v) for v in value]


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value):
        raise PlanError(f"{where}: expected a non-empty list of integer seeds")
    return value


def sweep_runs(
    arms: dict, seeds: list[int] | None = None, overrides: list[str] | None = None,
    only: list[str] | None = None, where: str = "sweep plan",
) -> list[SweepRun]:
    """The (arm, seed) runs of a plan, in plan order; `only` keeps the named arms."""
    if not isinstance(arms, dict) or not arms:
        raise PlanError(f"{where}: `arms` must map arm names to override lists")
    unknown = sorted(set(only or []) - set(arms))
    if unknown:
        raise PlanError(f"{where}: no arm named {unknown}; arms are {sorted(arms)}")
    default_seeds = _seeds(seeds if seeds is not None else [0], f"{where}: seeds")
    shared = list(overrides or [])
    runs = []
    for name, arm in arms.items():
        if only and name not in only:
            continue
        key = f"{where}: arms.{name}"
        if isinstance(arm, dict):
            extra = set(arm) - {"overrides", "seeds"}
            if extra:
                raise PlanError(f"{key}: unknown keys {sorted(extra)} (expected overrides, seeds)")
            arm_overrides = _str_list(arm.get("overrides", []), f"{key}.overrides")
            arm_seeds = _seeds(arm.get("seeds", default_seeds), f"{key}.seeds")
        else:
            arm_overrides, arm_seeds = _str_list(arm, key), default_seeds
        for seed in arm_seeds:
            runs.append(
                SweepRun(
                    f"{name}-s{seed}",
                    (*shared, *arm_overrides, f"rollout.seed={seed}", f"trainer.seed={seed}", f"run.name={name}-s{seed}"),
                )
            )
    return runs


def read_plan(path: str | Path) -> dict:
    """Read a plan file (see the module docstring): {"arms", "seeds", "overrides"}; its top-level
    keys are checked here, its arms by `sweep_runs`."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PlanError(f"cannot read the sweep plan {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise PlanError(f"{path}: expected a mapping with `arms`")
    unknown = set(spec) - {"arms", "seeds", "overrides"}
    if unknown:
        raise PlanError(f"{path}: unknown keys {sorted(unknown)} (expected arms, seeds, overrides)")
    plan = {"arms": spec.get("arms"), "seeds": spec.get("seeds"),
            "overrides": _str_list(spec.get("overrides", []), f"{path}: overrides")}
    return plan
