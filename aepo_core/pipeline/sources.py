"""Where a run's prompts and starting policy come from: the embedded task, or the user's own.

The one place that knows "synthetic" and "model.path is None" mean the embedded default, so the
I/O layer (aepo_core.io) reads only the user's files and the embedded task (aepo_core.task) only
builds its own things.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from aepo_core.config import Config, DataConfig
from aepo_core.io.datasets import load_file_split
from aepo_core.io.models import is_hub_id
from aepo_core.task.base_policy import ensure_base_policy
from aepo_core.task.synthetic import parse_terms, synthetic_table, task_profile


def load_prompt_table(data: DataConfig, split: str) -> pa.Table:
    """The normalised table (id, prompt, answer, source: strings) of a split, "train" or "eval".

    data.train == "synthetic": the embedded task's split (its held-out split for "eval" unless
    data.eval names a file); otherwise the user's file (DatasetError names file, row and key).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    source = data.train if split == "train" else (data.eval if data.eval is not None else data.train)
    if source == "synthetic":
        return synthetic_table(data.synthetic, split)
    return load_file_split(data, split)


def resolve_model_path(cfg: Config, log=print) -> Path:
    """cfg.model.path (an HF model folder or a hub id), or the embedded base policy (built on first
    use) when it is None. FileNotFoundError names a path that is neither."""
    if cfg.model.path:
        path = Path(cfg.model.path)
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path {path} is not an HF model folder (no config.json)")
        if not path.exists() and not is_hub_id(cfg.model.path):
            raise FileNotFoundError(f"model.path {path} does not exist (give an HF model folder or a hub id)")
        return path
    return ensure_base_policy(cfg.data.synthetic, cfg.model.cache_dir, log=log)


def task_metrics(data: DataConfig, model, tokenizer, prompts: list[str], prompt_ids: list[list[int]],
                 response_ids: list[list[int]]) -> dict[str, float]:
    """What the embedded task knows about sampled rows beyond their reward (empty for user data).

    For the synthetic task: the valid-choice metrics of the rows under `model` (T = 1;
    :func:`aepo_core.task.synthetic.choice_metrics`) and ``choice/uniform_valid_entropy``, the entropy
    (nats/token) of a policy that answers right and picks uniformly among the valid next terms on
    these prompts: the most a correct policy can have, the upper reference of the entropy targets.
    """
    if data.train != "synthetic" or not prompts:
        return {}
    terms = [parse_terms(p) for p in prompts]
    if any(t is None for t in terms):  # a user prompt file named "synthetic"? say nothing rather than guess
        return {}
    return task_profile(model, tokenizer, prompt_ids, response_ids, terms)
