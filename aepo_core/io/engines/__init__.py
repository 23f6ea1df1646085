"""Rollout engines behind one interface (`RolloutEngine`): HF transformers (default) and vLLM."""

from __future__ import annotations

from pathlib import Path

from aepo_core.config import Config
from aepo_core.io.engines.base import Completion, RolloutEngine, SamplingRequest

__all__ = ["Completion", "RolloutEngine", "SamplingRequest", "make_engine", "shared_engine", "release_shared_engine"]

# One engine per process, kept across stages and iterations (vLLM takes seconds to start; the next
# policy is loaded into it in place).
_shared: dict = {}


def make_engine(cfg: Config, model_path: str | Path, show_progress: bool = False) -> RolloutEngine:
    """The engine named by cfg.rollout.engine, loaded with the policy in `model_path`."""
    if cfg.rollout.engine == "hf":
        from aepo_core.io.engines.hf import HFRolloutEngine
        from aepo_core.io.models import load_policy, load_tokenizer, resolve_device

        # same device as the update step (trainer.device; "auto": cuda when present)
        model = load_policy(
            model_path, device=resolve_device(cfg.trainer), dtype="float32", trust_remote_code=cfg.model.trust_remote_code
        )
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        return HFRolloutEngine(model, tokenizer, batch_size=cfg.rollout.batch_size, show_progress=show_progress)
    from aepo_core.io.engines.vllm import VLLMRolloutEngine
    from aepo_core.io.models import load_tokenizer

    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    return VLLMRolloutEngine(
        model_path, tokenizer, cfg.rollout.vllm, seed=cfg.rollout.seed, show_progress=show_progress
    )


def _engine_key(cfg: Config) -> str:
    import json

    return json.dumps(
        [cfg.rollout.engine, cfg.rollout.vllm.model_dump(), cfg.rollout.batch_size, cfg.rollout.seed,
         cfg.model.trust_remote_code, cfg.trainer.device],
        sort_keys=True,
    )


def shared_engine(cfg: Config, model_path: str | Path) -> RolloutEngine:
    """The process's engine for this config, holding the policy in `model_path`."""
    key = _engine_key(cfg)
    # the folder's identity includes when it was written: a rerun rewrites a checkpoint in place
    folder = Path(model_path).resolve() if Path(model_path).exists() else Path(model_path)  # or a hub id
    written = (folder / "config.json").stat().st_mtime_ns if (folder / "config.json").is_file() else "hub"
    path = f"{folder}@{written}"
    if _shared.get("key") == key:
        if _shared["path"] != path:
            _shared["engine"].load_weights(folder)
            _shared["path"] = path
        return _shared["engine"]
    release_shared_engine()
    _shared.update(key=key, path=path, engine=make_engine(cfg, folder))
    return _shared["engine"]


def release_shared_engine() -> None:
    engine = _shared.pop("engine", None)
    _shared.clear()
    if engine is not None:
        engine.close()
