"""Shared fixtures: a small tokenizer and the tests' one tiny random Qwen2 builder (:func:`tiny_qwen`,
also as the ``tiny_model`` fixture) for fast engine and update tests, and the real base policy (built
once per session into $AEPO_CACHE, or a temporary cache) for the slow tests."""

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
import transformers

from aepo_core.task import synthetic
from aepo_core.task.base_policy import BaseRecipe, build_model
from aepo_core.task.tokenizer import build_tokenizer

VOCAB = 32  # tiny_qwen's vocabulary without a tokenizer


def tiny_qwen(
    seed: int = 0,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    tokenizer=None,
    **config,
) -> transformers.Qwen2ForCausalLM:
    """The tests' tiny random (untrained) Qwen2, its weights fixed by ``seed`` and the sizes.

    Without a tokenizer: a bare Qwen2 of vocabulary :data:`VOCAB` (4 heads, 2 KV heads, 64
    positions); ``config`` adds Qwen2Config settings (e.g. ``attention_dropout=0.1``). With one: the
    project's own builder (:func:`aepo_core.task.base_policy.build_model`) at these sizes, so the
    vocabulary, special token ids and tied embeddings are those of the real base policy.
    """
    if tokenizer is not None:
        if config:
            raise TypeError(f"tiny_qwen with a tokenizer takes no extra config: {sorted(config)}")
        recipe = BaseRecipe(
            seed=seed, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers
        )
        return build_model(recipe, tokenizer)
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **config,
    )
    return transformers.Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="session")
def tokenizer():
    rng = random.Random(0)
    problems = synthetic.generate_problems(500, 0, 3, 5, 9, "t")
    corpus = [synthetic.worked_trace(p.terms, rng) for p in problems] + [p.prompt for p in problems]
    return build_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A random (untrained) tiny Qwen2 on the test tokenizer: enough to test the engine's mechanics quickly."""
    return tiny_qwen(hidden_size=64, intermediate_size=128, tokenizer=tokenizer).eval()


@pytest.fixture(scope="session")
def base_policy_dir(tmp_path_factory) -> Path:
    """The real embedded base policy (a few minutes to build the first time)."""
    from aepo_core.config import SyntheticTaskConfig
    from aepo_core.task.base_policy import ensure_base_policy

    cache = os.environ.get("AEPO_CACHE") or tmp_path_factory.mktemp("aepo-cache")
    return ensure_base_policy(SyntheticTaskConfig(), cache_dir=cache, log=None)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models gain nothing from intra-op threads, and on a busy
    2-core machine the thread pool's spin-waiting made each matmul ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
