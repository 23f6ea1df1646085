from pathlib import Path

import pytest

from aepo_core.config import load_config
from aepo_core.pipeline.sweeps import PlanError, read_plan, sweep_runs


def test_runs_per_arm_and_seed_with_shared_overrides_first(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "seeds: [0]\noverrides: [rollout.n=4]\n"
        "arms:\n  grpo: {overrides: [algorithm.name=grpo], seeds: [0, 1]}\n  aepo: [algorithm.target_entropy=0.1]\n"
    )
    spec = read_plan(plan)
    runs = sweep_runs(**spec)
    assert [r.name for r in runs] == ["grpo-s0", "grpo-s1", "aepo-s0"]
    assert runs[1].overrides == (
        "rollout.n=4", "algorithm.name=grpo", "rollout.seed=1", "trainer.seed=1", "run.name=grpo-s1"
    )
    assert [r.name for r in sweep_runs(**spec, only=["aepo"])] == ["aepo-s0"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("arms: {a: [x=1]}\nrepeats: 2\n", "unknown keys ['repeats']"),
        ("arms: {a: {overrides: [x=1], seed: [1]}}\n", "arms.a: unknown keys ['seed']"),
        ("arms: {a: [x=1]}\nseeds: [zero]\n", "seeds: expected a non-empty list of integer seeds"),
        ("arms: {a: x=1}\n", "arms.a: expected a list of overrides"),
        ("arms: [a, b]\n", "`arms` must map arm names"),
    ],
)
def test_bad_plans_name_the_file_and_key(tmp_path, text, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    with pytest.raises(PlanError, match=r".*") as err:
        sweep_runs(**read_plan(plan), where=str(plan))
    assert message in str(err.value) and str(plan) in str(err.value)


def test_unknown_arm_selection_lists_the_arms():
    with pytest.raises(PlanError, match=r"no arm named \['c'\]; arms are \['a', 'b'\]"):
        sweep_runs({"a": [], "b": []}, only=["c"])


SHIPPED_PLANS = sorted((Path(__file__).parents[1] / "data" / "sweeps").glob("*.yaml"))


def test_the_shipped_plans_are_found():
    assert len(SHIPPED_PLANS) >= 2  # entropy-targets.yaml, adaptive-seeds.yaml


@pytest.mark.parametrize("plan", SHIPPED_PLANS, ids=lambda p: p.name)
def test_shipped_plans_give_valid_configs(plan):
    """Every plan in data/sweeps/ reads, and each of its runs' overrides makes a valid config (a typo
    in a plan otherwise surfaces only when its run starts, maybe hours into a sweep)."""
    p = read_plan(plan)
    runs = sweep_runs(p["arms"], p["seeds"], p["overrides"], where=str(plan))
    assert runs and len({r.name for r in runs}) == len(runs)
    for run in runs:
        load_config(None, list(run.overrides))


def test_the_pid_config_is_the_plans_b64_lr5_arm():
    """data/configs/aepo-adaptive-pid.yaml says it is the adaptive-seeds plan's b64-lr5 arms: the
    algorithm, rollout and trainer settings of a run of that arm and of the config must not drift
    apart (the trainer's dtype aside: the plan pins float32 for the CPU, the config leaves it auto)."""
    repo = Path(__file__).parents[1]
    p = read_plan(repo / "data" / "sweeps" / "adaptive-seeds.yaml")
    run = sweep_runs(p["arms"], p["seeds"], p["overrides"], only=["b64-lr5-0.12"])[0]
    from_plan = load_config(None, list(run.overrides))
    from_config = load_config(repo / "data" / "configs" / "aepo-adaptive-pid.yaml",
                              ["rollout.seed=0", "trainer.seed=0"])
    assert from_config.algorithm == from_plan.algorithm
    assert from_config.rollout == from_plan.rollout
    assert from_config.trainer.model_dump(exclude={"dtype"}) == from_plan.trainer.model_dump(exclude={"dtype"})
    assert from_config.trainer.lr == 5.0e-5  # the arm's one trainer change, which the comparison above covers
