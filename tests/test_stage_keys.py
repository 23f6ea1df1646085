"""Every config key a stage reads is declared in its record (issue 13): the key's digest is in the
stage's manifest, so changing it makes exactly that stage (and its readers) stale. A stage that read
an undeclared key would silently keep a result computed under another value."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from aepo_core.config import EXECUTION_ONLY, load_config
from aepo_core.pipeline import stages
from aepo_core.pipeline.rundir import RunDir

pytestmark = pytest.mark.slow


class _Recording:
    """A read-only view of a config section that records the dotted path of every leaf read."""

    def __init__(self, node: BaseModel, prefix: str, seen: set[str]) -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name: str):
        value = getattr(self._node, name)
        if name.startswith("_") or callable(value) and not isinstance(value, BaseModel):
            return value  # model_dump, model_copy, ...: the framework's own whole-config reads
        path = f"{self._prefix}.{name}" if self._prefix else name
        if isinstance(value, BaseModel):
            return _Recording(value, path, self._seen)
        self._seen.add(path)
        return value


def _declared(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.mark.parametrize("algorithm", ["aepo", "aepo-in-order", "grpo", "grpo-lora", "kl_cov", "adaptive_entropy"])
def test_every_stage_reads_only_declared_keys(algorithm, base_policy_dir, tmp_path, monkeypatch, one_thread):
    cfg = load_config(None, [
        f"model.path={base_policy_dir}", f"run.runs_root={tmp_path}", "run.iterations=2", "data.synthetic.n_train=32",
        "data.synthetic.n_eval=4", "rollout.prompts_per_batch=2", "rollout.n=2", "rollout.max_new_tokens=16",
        "evaluation.n=1", "evaluation.num_prompts=2", "evaluation.every=1", f"algorithm.name={algorithm.split('-')[0]}",
        *(["algorithm.kl_coef=0.01"] if algorithm.startswith("grpo") else []),
        *(["model.lora.enabled=true"] if algorithm.endswith("-lora") else []),
        *(["rollout.regulariser_sampling=in_order"] if algorithm == "aepo-in-order" else []),
    ])
    run = stages.init_run(cfg, log=None)
    seen: dict[str, set[str]] = {}
    real_config = RunDir.config
    current: list[str] = []

    def recorded_config(self, iteration=None):  # the stages read their iteration's config (RunDir.config(i))
        return _Recording(real_config(self, iteration), "", seen.setdefault(current[0], set()))

    monkeypatch.setattr(RunDir, "config", recorded_config)
    for iteration in range(2):
        for record in stages.PIPELINE.values():
            current[:] = [record.name]
            record.run(run, iteration)
    for name in stages.PIPELINE:
        # execution-only keys (how many processes, where) are in no digest by design: reading them is free
        undeclared = sorted(k for k in seen.get(name, ())
                            if not _declared(k, stages.stage_keys(cfg, name)) and k not in EXECUTION_ONLY)
        assert not undeclared, f"stage {name!r} reads undeclared config keys {undeclared}"
        assert seen.get(name), f"stage {name!r} read no config key at all: the recorder is not in the way"


def test_metric_changes_hand_values():
    from aepo_core.pipeline.stages import metric_changes

    before = {"accuracy": 0.8125, "pass_at_8": 1.0, "n": 8.0, "generate_seconds": 3.0, "ok": True}
    after = {"accuracy": 0.84375, "pass_at_8": 1.0, "n": 16.0, "generate_seconds": 5.0, "tokens_per_s": 9.0,
             "bad_gold": 0.0, "ok": False, "label": "x"}
    # unchanged, timing, bool and text metrics left out; a metric new to the stage shows "-"
    assert metric_changes(before, after) == ["accuracy: 0.8125 -> 0.8438", "bad_gold: - -> 0", "n: 8 -> 16"]
    assert metric_changes(None, {"a": 1.0}) == ["a: - -> 1"]
    many = {f"m{i:02d}": float(i) for i in range(20)}
    out = metric_changes(None, many, limit=3)
    assert out[:3] == ["m00: - -> 0", "m01: - -> 1", "m02: - -> 2"] and out[3] == "... and 17 more"
