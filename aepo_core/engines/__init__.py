"""Rollout engines behind one interface (`RolloutEngine`): HF transformers (default) and vLLM."""

from __future__ import annotations

from pathlib import Path

from aepo_core.config import Config
from aepo_core.engines.base import Completion, RolloutEngine, SamplingRequest

__all__ = ["Completion", "RolloutEngine", "SamplingRequest", "make_engine"]


def make_engine(cfg: Config, model_path: str | Path, show_progress: bool = False) -> RolloutEngine:
    """The engine named by cfg.rollout.engine, loaded with the policy in `model_path`."""
    if cfg.rollout.engine == "hf":
        from aepo_core.engines.hf import HFRolloutEngine
        from aepo_core.models import load_policy, load_tokenizer
        from aepo_core.update import resolve_device

        # same device as the update step (trainer.device; "auto": cuda when present)
        model = load_policy(
            model_path, device=resolve_device(cfg.trainer), dtype="float32", trust_remote_code=cfg.model.trust_remote_code
        )
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        return HFRolloutEngine(model, tokenizer, batch_size=cfg.rollout.batch_size, show_progress=show_progress)
    # The vLLM engine is not built yet (it is its own piece of work); say so instead of failing later.
    raise NotImplementedError(
        "rollout.engine 'vllm' is not available in this version; use rollout.engine=hf"
    )
