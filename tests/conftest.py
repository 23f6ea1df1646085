"""Shared fixtures: a small tokenizer and random tiny Qwen2 for fast engine tests, and the real base
policy (built once per session into $AEPO_CACHE, or a temporary cache) for the slow tests."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

# Prefect reads its settings at import: point it at a private home, offline and quiet, first.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="aepo-prefect-home-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"

import pytest
import torch

from aepo_core import synthetic
from aepo_core.base_policy import BaseRecipe, build_model
from aepo_core.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    rng = random.Random(0)
    problems = synthetic.generate_problems(500, 0, 3, 5, 9, "t")
    corpus = [synthetic.worked_trace(p.terms, rng) for p in problems] + [p.prompt for p in problems]
    return build_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A random (untrained) tiny Qwen2: enough to test the engine's mechanics quickly."""
    model = build_model(BaseRecipe(hidden_size=64, intermediate_size=128, num_layers=2), tokenizer)
    return model.eval()


@pytest.fixture(scope="session")
def base_policy_dir(tmp_path_factory) -> Path:
    """The real embedded base policy (a few minutes to build the first time)."""
    from aepo_core.base_policy import ensure_base_policy
    from aepo_core.config import SyntheticTaskConfig

    cache = os.environ.get("AEPO_CACHE") or tmp_path_factory.mktemp("aepo-cache")
    return ensure_base_policy(SyntheticTaskConfig(), cache_dir=cache, log=None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (about 7 s to start; the limit is a hang guard)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):
        yield



@pytest.fixture(scope="session")
def tiny_overrides():
    """Overrides for a small, fast pipeline run on the real base policy (see tiny_run.py)."""
    from tiny_run import tiny_overrides as make

    return make
