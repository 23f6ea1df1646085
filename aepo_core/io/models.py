"""Loading and saving policies: HF folders (config.json + model.safetensors + tokenizer files)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from aepo_core.atomic import atomic_dir
from aepo_core.config import TrainerConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(trainer_cfg: TrainerConfig) -> torch.device:
    """trainer.device -> torch.device ("auto": cuda when available, else cpu)."""
    if trainer_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(trainer_cfg.device)


def is_hub_id(text: str) -> bool:
    """'org/name' that is not a local path: transformers and vLLM fetch it (needs network access)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not Path(text).exists() and not text.startswith((".", "~"))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(
    path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32", trust_remote_code: bool = False
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    return model.to(device)


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Write an HF folder atomically: a temporary sibling folder renamed into place."""
    with atomic_dir(folder) as tmp:
        write_policy(model, tokenizer, tmp)
    return Path(folder)


def write_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model (safetensors) and tokenizer files into an existing folder.

    state_dict: the weights to write instead of the model's own (a sharded model's gathered full
    state, aepo_core.io.sharded.full_state_dict; ``save_pretrained`` empties the dict it is given,
    so it gets a copy).
    """
    if state_dict is None:
        model.save_pretrained(str(folder), safe_serialization=True)
    else:
        model.save_pretrained(str(folder), safe_serialization=True, state_dict=dict(state_dict))
    tokenizer.save_pretrained(str(folder))
