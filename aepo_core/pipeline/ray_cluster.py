"""Stages on N processes on a Ray cluster (``run.ray_address``; the optional extra ``.[ray]``).

    flow process (Prefect task)                     Ray cluster (any of its nodes)
      stages.update(run, i) ── N > 1 ──►  TorchTrainer, N workers: init_process_group (Ray Train),
        ray.init(address); waits; a        then stages.update(run, i) as this rank: the same SPMD
        worker's error is the stage's      program torchrun runs (aepo_core.pipeline.distributed)
      stages.rollout / evaluate_stage  ─►  D engine actors (aepo_core.io.engines.ray_actors): the
        runs here, its engine one          stage sends each a contiguous shard of every call
        RayEngine over D actors

The update is the torchrun one under another launcher: Ray Train starts the N workers, gives them a
process group (gloo on CPU, nccl one GPU per worker) and calls :func:`rank_worker`, which runs
``stages.update`` as its rank; rank 0 publishes. The rollout and evaluation stages stay in the
flow's process (the regulariser's in-order loop and the verifier run once) and only the sampling
goes to the actors; the actors live for one stage, so the update's workers get their CPUs or GPUs.

What every node must share: the run directory at the same path (the workers read the rollouts and
write the checkpoint there; the actors load the policy from it), the starting policy's folder, and
this package installed in the same Python environment. The flow passes its ``AEPO_*`` variables and
PYTHONPATH to the cluster's workers (``runtime_env``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aepo_core.errors import UserError
from aepo_core.pipeline.distributed import DistributedStageFailed, root_cause
from aepo_core.pipeline.processes import rank_threads


def require_ray():
    """The ``ray`` module; a UserError saying what to install when it is missing."""
    try:
        import ray
    except ImportError:
        raise UserError("run.ray_address is set but Ray is not installed: pip install -e '.[ray]'") from None
    return ray


def connect(address: str) -> None:
    """Join the Ray cluster at `address` once per process (a later call with the cluster already
    joined does nothing). The workers get this process's AEPO_* variables and PYTHONPATH.

    Raises UserError naming the address when no cluster answers there."""
    ray = require_ray()
    if ray.is_initialized():
        return
    refused = unreachable(address)
    if refused:  # ray.init would retry for minutes before saying so
        raise UserError(f"run.ray_address={address}: no Ray cluster answers there ({refused}); start one with "
                        "`ray start --head` (README: More than one GPU or machine)")
    env = {k: v for k, v in os.environ.items() if k.startswith("AEPO_") or k == "PYTHONPATH"}
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"run.ray_address={address}: no Ray cluster could be joined there ({exc}); start one "
                        "with `ray start --head` (README: More than one GPU or machine)") from None


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing listens at a "HOST:PORT" address (the refusal or timeout), or None: something
    does, or the address is another form ("auto", "ray://...") that ray.init resolves itself."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or address.startswith("ray://"):
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def rank_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: this rank's part of the stage function ``config["stage"]`` (the process
    group is Ray Train's). `config`: stage (a function such as ``stages.update``, pickled by name),
    run_dir, iteration, cpus, progress, upstream (:func:`launch_on_ray`)."""
    import torch

    from aepo_core.io.models import resolve_device
    from aepo_core.pipeline.processes import use_threads
    from aepo_core.pipeline.rundir import RunDir

    run = RunDir(Path(config["run_dir"]))
    cfg = run.config(config["iteration"])
    if resolve_device(cfg.trainer).type == "cuda":
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    use_threads(config["cpus"])
    config["stage"](run, config["iteration"], show_progress=config["progress"] and torch.distributed.get_rank() == 0,
                    upstream=config["upstream"])


def launch_on_ray(stage: Callable[..., Any], cfg, run_root: Path, iteration: int, nproc: int,
                  show_progress: bool = False, upstream: dict[str, str] | None = None) -> None:
    """Run `stage` (the update stage function) of `iteration` on `nproc` Ray Train workers of the
    cluster at run.ray_address (one GPU each where the trainer runs on GPUs) and wait for it.
    `upstream`: the stage's input digests, checked by the caller (None: every worker checks them).

    Raises DistributedStageFailed naming the stage, the run, the iteration and the worker's error."""
    from aepo_core.io.models import resolve_device

    connect(cfg.run.ray_address)
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = resolve_device(cfg.trainer).type == "cuda"
    cpus = rank_threads(cfg.run.threads, nproc)  # reserved by each worker, and its torch threads
    name = stage.__name__
    trainer = TorchTrainer(
        rank_worker,
        train_loop_config={"stage": stage, "run_dir": str(Path(run_root).resolve()), "iteration": iteration,
                           "cpus": cpus, "progress": show_progress, "upstream": upstream},
        scaling_config=ScalingConfig(num_workers=nproc, use_gpu=gpu, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=f"aepo-{name}-{Path(run_root).name}-{iteration}"),
    )
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise DistributedStageFailed(
            f"the {name} stage of iteration {iteration} of {run_root} failed on {nproc} Ray Train workers "
            f"({cfg.run.ray_address}): {root_cause(str(exc))}") from None
