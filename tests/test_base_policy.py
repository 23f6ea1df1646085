"""The embedded base policy, built for real (a few minutes once per session)."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from aepo_core.config import SyntheticTaskConfig, load_config
from aepo_core.pipeline.evaluation import evaluate_model
from aepo_core.task.base_policy import ensure_base_policy

pytestmark = pytest.mark.slow


def test_base_policy_is_a_standard_hf_folder(base_policy_dir):
    files = {p.name for p in base_policy_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    model = AutoModelForCausalLM.from_pretrained(base_policy_dir)
    tok = AutoTokenizer.from_pretrained(base_policy_dir)
    assert model.config.model_type == "qwen2"
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000
    assert model.config.eos_token_id == tok.eos_token_id
    info = json.loads((base_policy_dir / "aepo_base.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_cached_build_is_reused_not_rebuilt(base_policy_dir, monkeypatch):
    """Behaviour, not speed: a second ensure_base_policy finds the folder and never calls the builder."""
    import aepo_core.task.base_policy as bp
    from aepo_core.pipeline.rundir import folder_digest

    before = folder_digest(base_policy_dir), {p: p.stat().st_mtime_ns for p in base_policy_dir.iterdir()}
    calls = []
    monkeypatch.setattr(bp, "build_base_policy", lambda *args, **kwargs: calls.append(args))
    again = ensure_base_policy(SyntheticTaskConfig(), cache_dir=base_policy_dir.parent, log=None)
    assert again == base_policy_dir and calls == []
    assert (folder_digest(base_policy_dir), {p: p.stat().st_mtime_ns for p in base_policy_dir.iterdir()}) == before
    # force=True does call it (the fake builder leaves the folder as it was)
    ensure_base_policy(SyntheticTaskConfig(), cache_dir=base_policy_dir.parent, force=True, log=None)
    assert len(calls) == 1 and calls[0][1] == base_policy_dir


def test_base_policy_accuracy_and_entropy_in_band(base_policy_dir):
    cfg = load_config(None, [f"model.path={base_policy_dir}", "evaluation.n=8", "evaluation.temperature=1.0"])
    records, metrics = evaluate_model(cfg, base_policy_dir)
    assert records.num_rows == 8 * cfg.data.synthetic.n_eval
    # measured on this machine kind: avg@8 0.90, nll 0.145 (docs/results.md); the bands leave room for
    # other CPUs' numerics, not for a policy that stopped copying the terms (~0.1) or never explores
    assert 0.8 <= metrics["accuracy"] <= 0.97, metrics
    assert 0.1 <= metrics["entropy_nll"] <= 0.2, metrics
    assert metrics["pass_at_8"] > metrics["pass_at_1"]
    assert abs(metrics["pass_at_1"] - metrics["accuracy"]) < 1e-9  # pass@1 is avg@n
    assert metrics["truncated_fraction"] < 0.05


def test_base_policy_entropy_is_choice_among_valid_answers(base_policy_dir):
    """The build's profile (aepo_base.json): nearly all probability on valid next terms at choice
    positions, real entropy among them, and a total entropy below the uniform-valid ceiling's reach."""
    profile = json.loads((base_policy_dir / "aepo_base.json").read_text())["profile"]
    assert profile["choice/valid_prob"] >= 0.95, profile  # the bar; measured 0.983
    assert 0.3 <= profile["choice/valid_entropy"] <= 0.8, profile  # nats among the valid terms; measured 0.52
    assert 0.2 < profile["uniform_valid_entropy"] < 0.3, profile  # log(n!) / tokens for 4-7 terms


def test_the_readmes_base_policy_numbers_are_the_builds_own(base_policy_dir):
    """The README quotes the base's profile (`aepo build-base` prints it; aepo_base.json keeps it):
    the middle of what machines gave (avg@8 0.86-0.90, entropy 0.145-0.159 measured on five machines:
    README, docs/results.md), and the tolerances below cover that spread, so a build on any of them
    passes and a recipe change that moves the numbers further fails here until the README is
    refreshed."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.search(r"avg@8 ≈ ([0-9.]+), (\d+) % of the probability on valid next terms, ([0-9.]+) nats among "
                       r"them,\s+sampled-token entropy ≈ ([0-9.]+) nats/token against ([0-9.]+)", readme)
    assert quoted, "the README's base policy profile sentence changed: update this test with it"
    accuracy, valid, among, entropy, uniform = (float(g) for g in quoted.groups())
    profile = json.loads((base_policy_dir / "aepo_base.json").read_text())["profile"]
    assert abs(profile["accuracy"] - accuracy) <= 0.05
    assert abs(100 * profile["choice/valid_prob"] - valid) <= 1.5
    assert abs(profile["choice/valid_entropy"] - among) <= 0.05
    assert abs(profile["entropy_nll"] - entropy) <= 0.012
    assert abs(profile["uniform_valid_entropy"] - uniform) <= 0.001
