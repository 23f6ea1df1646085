"""LoRA through the `peft` library: wrap a frozen policy with adapters, save them, merge them.

The update stage trains only the adapters (``model.lora.enabled``): it loads the run's starting
policy, wraps it (:func:`trainable_lora`: new adapters at iteration 0, the previous update's
``adapter/`` later), and after the step saves the adapter (:func:`save_adapter`) and the merged
weights (:func:`merge_into_base`) as a standard HF folder, so rollout, evaluation and a vLLM reload
read ``policy/`` exactly as without LoRA. The KL reference is the same model with its adapters
switched off (:class:`AdaptersDisabled`): the frozen base, without a second copy in memory.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from aepo_core.config import LoraConfig

ADAPTER = "adapter"  # the adapter's folder in an update stage


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    """model.lora -> peft's LoraConfig for a causal LM (no bias training: only A and B matrices)."""
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainable_lora(base: PreTrainedModel, cfg: LoraConfig, adapter: Path | None, seed: int) -> PeftModel:
    """The base policy with trainable LoRA adapters; every base weight frozen.

    Args:
        base: the run's starting policy (loaded fresh: peft wraps its modules in place).
        cfg: model.lora.
        adapter: the previous update's adapter folder to continue from, or None for new adapters
            (A random from ``seed``, B zero: the wrapped model starts as the base, exactly).
        seed: the random seed of new adapters.
    Raises:
        ValueError: a target module the model does not have (peft's message names it).
    """
    with _quiet_peft():
        if adapter is not None:
            return PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        with torch.random.fork_rng(devices=[]):  # the adapters' init draws from the RNG; leave the caller's stream alone
            torch.manual_seed(seed)
            return get_peft_model(base, peft_config(cfg))


@contextlib.contextmanager
def _quiet_peft():
    """peft (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model,
    and transformers 5 warns about it on every update: peft's business, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


class AdaptersDisabled:
    """The KL reference of a LoRA run: the wrapped model called with its adapters switched off.

    Base weights never train under LoRA, so this is the frozen starting policy, and it shares every
    tensor with the policy (no second copy). It offers what ``compute_logprobs`` uses of a model:
    calling it, ``training``, ``eval()``, ``train(mode)`` and ``parameters()``.
    """

    def __init__(self, model: PeftModel) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> AdaptersDisabled:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> AdaptersDisabled:
        self.model.train(mode)
        return self

    def parameters(self):
        return self.model.parameters()


def save_adapter(model: PeftModel, folder: Path) -> None:
    """Write the adapter (peft's ``adapter_config.json`` + ``adapter_model.safetensors``) into `folder`."""
    with _quiet_peft():
        model.save_pretrained(str(folder), safe_serialization=True)


def merge_into_base(model: PeftModel) -> PreTrainedModel:
    """The base model with the adapters merged into its weights (W + alpha / r * B A), adapters removed.

    In place: `model` is consumed (the update stage calls this last, after saving the adapter and
    the optimiser state), so no second copy of the weights is made.
    """
    with torch.no_grad():
        return model.merge_and_unload()


def adapter_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters of a LoRA-wrapped model (every one an adapter matrix)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
