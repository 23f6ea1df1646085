"""A policy trained on several processes: FSDP2 sharding, the consolidated policy, and an optimiser
state any number of processes can resume from.

Every rank loads the whole policy from its HF folder and shards it (:func:`shard_policy`); the
update stage writes the same consolidated ``policy/`` folder as a single process
(:func:`full_state_dict`, written by rank 0) and the optimiser state as a
``torch.distributed.checkpoint`` (DCP) folder (:func:`save_optimizer`), whose shards are resharded on
load for any world size, one process included (:func:`load_optimizer`). The single-process update
still writes ``optimizer.pt`` (``optimizer.state_dict()``); :func:`load_optimizer` reads both, so a
run moves between 1 and N processes in either direction.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# the names of the optimiser state in an update stage's folder
OPTIMIZER_FILE = "optimizer.pt"  # one process: optimizer.state_dict() (torch.save)
OPTIMIZER_DCP = "optimizer"  # N processes: a torch.distributed.checkpoint folder


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the module classes transformers declares as never split across
    devices (``_no_split_modules``, e.g. Qwen2DecoderLayer). ValueError when it declares none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no decoder layer class (_no_split_modules): "
                         "cannot shard it layer by layer")
    return layers


def shard_policy(model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard `model` in place over the default process group with FSDP2: each decoder layer, then
    the root (embeddings, final norm, LM head). Returns `model` (its class now an FSDP module).

    amp_dtype: the update's autocast dtype (:func:`aepo_core.core.update.autocast_dtype` of
    trainer.dtype). On GPUs with bfloat16 the parameters are gathered in bfloat16 and gradients
    reduced in float32 (MixedPrecisionPolicy); otherwise (trainer.dtype float32, or a CPU) the shards
    stay float32, as the single process's parameters do. Gradients are SUMMED over ranks
    (divide factor 1), not averaged: each rank's loss is its micro-batches' loss sums over the
    whole mini-batch's normaliser (aepo_core.core.ranks), so the sum is the single-process gradient.
    """
    # the single process's precision (trainer.dtype: autocast_dtype): bf16 passes only where it
    # autocasts to bf16; on CPUs the update's own autocast does that over fp32 shards
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" and amp_dtype == torch.bfloat16 else MixedPrecisionPolicy()
    model.to(device)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    # the root too frees its gathered weights after each forward pass (FSDP2 keeps them by default):
    # after a no-grad pass (pi_old's log-probs) a backward pass through the kept weights gave wrong
    # gradients (measured on 2 ranks: grad norm 0.47 against the single process's 1.03)
    fully_shard(model, mp_policy=mp, reshard_after_forward=True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # a plain SUM: a divide factor is otherwise applied with PREMUL_SUM, which gloo lacks
            module.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on rank 0 (an empty dict on the other ranks). A collective:
    every rank calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write the optimiser state as a DCP folder (each rank its shards; rank 0 the metadata), keyed
    by parameter name, so any world size can load it. A collective: every rank calls it with the same
    folder."""
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage_dir: Path) -> None:
    """Load the optimiser state an update stage wrote into `optimizer` (over `model`'s parameters),
    whichever world size wrote it and whichever loads it.

    Reads ``OPTIMIZER_DCP/`` when present (any writer, resharded to this world), else
    ``OPTIMIZER_FILE`` (a single process's ``optimizer.state_dict()``: loaded as it always was by a
    single process; N processes convert its parameter indices to names and shard it).
    FileNotFoundError naming the stage folder when it holds neither.
    """
    folder, file = stage_dir / OPTIMIZER_DCP, stage_dir / OPTIMIZER_FILE
    if folder.is_dir():
        # the template: this optimiser's (initialised) state by name, loaded into in place
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        with warnings.catch_warnings():  # one process reading it is intended: torch warns all the same
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
    elif file.is_file():
        device = next(model.parameters()).device
        saved = torch.load(file, map_location=device if not is_sharded(model) else "cpu", weights_only=True)
        if not is_sharded(model):
            optimizer.load_state_dict(saved)
            return
        set_optimizer_state_dict(model, optimizer, optim_state_dict=_by_name(model, saved),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        raise FileNotFoundError(f"{stage_dir} holds no optimiser state ({OPTIMIZER_DCP}/ or {OPTIMIZER_FILE})")


def _by_name(model: torch.nn.Module, saved: dict) -> dict:
    """A single process's optimizer.state_dict() (parameters by index, in the order of the
    trainable parameters it was made over: aepo_core.core.update.make_optimizer) keyed by
    parameter name, the form torch.distributed.checkpoint.state_dict shards."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]]
    return {"state": {names[i]: value for i, value in saved["state"].items()}, "param_groups": groups}


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
