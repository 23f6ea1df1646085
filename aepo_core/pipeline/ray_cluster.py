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
PYTHONPATH to the cluster's workers (``runtime_env``); anything else (HF_*, NCCL_*, CUDA settings)
is each node's own, from the environment its ``ray start`` ran in.

What each worker or actor reserves is decided once (:func:`worker_resources`), against the cluster's
totals, so that a request the cluster cannot meet is an error at once rather than a wait.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aepo_core.config import Config
from aepo_core.errors import UserError
from aepo_core.pipeline.distributed import DistributedStageFailed, root_cause


def require_ray():
    """The ``ray`` module; a UserError saying what to install when it is missing."""
    try:
        import ray
    except ImportError:
        raise UserError("run.ray_address is set but Ray is not installed: pip install -e '.[ray]'") from None
    return ray


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


def connect(address: str) -> None:
    """Join the Ray cluster at `address` once per process (a process that has joined a cluster stays
    on it: a later call does nothing). The workers get this process's AEPO_* variables and PYTHONPATH.

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


def uses_gpus(device: str, cluster: dict[str, float]) -> bool:
    """Whether the workers take GPUs: trainer.device "cuda" yes, "cpu" no, "auto" when the cluster has
    any (decided from the cluster, not from the flow's machine, which may have none)."""
    return device == "cuda" or (device == "auto" and cluster.get("GPU", 0) > 0)


def worker_resources(n: int, gpus_each: int, threads: int | None, cluster: dict[str, float], key: str) -> dict[str, float]:
    """What each of `n` Ray workers (or engine actors) reserves: {"CPU": c, "GPU": gpus_each}.

    Args:
        n: workers. gpus_each: GPUs per worker (0 on CPUs; a vLLM engine's tensor_parallel_size).
        threads: run.threads, shared by the n workers; None: on CPUs the cluster's CPUs shared, on
            GPUs one CPU each. c is also the worker's torch threads.
        cluster: ``ray.cluster_resources()`` (totals over the nodes). key: the setting that asked
            for n (named in the error).
    Raises UserError when n workers do not fit the cluster's totals (Ray would wait for them for ever).
    """
    cpus_total, gpus_total = int(cluster.get("CPU", 0)), int(cluster.get("GPU", 0))
    if gpus_each:
        cpus = max(1, threads // n) if threads else 1
    else:
        cpus = max(1, (threads or cpus_total) // n)
    if n * cpus > cpus_total or n * gpus_each > gpus_total:
        raise UserError(f"{key}={n}: {n} Ray workers of {cpus} CPU and {gpus_each} GPU each do not fit the cluster "
                        f"({cpus_total} CPUs, {gpus_total} GPUs): lower {key} or run.threads, or add nodes")
    return {"CPU": cpus, "GPU": gpus_each}


def cluster_resources_each(cfg: Config, n: int, gpus_on_gpus: int, key: str) -> dict[str, float]:
    """What each of `n` workers asks of the joined cluster: `gpus_on_gpus` GPUs where the cluster's
    GPUs are used (`uses_gpus`), CPUs as `worker_resources` decides (UserError when they do not fit)."""
    import ray

    cluster = ray.cluster_resources()
    gpus = gpus_on_gpus if uses_gpus(cfg.trainer.device, cluster) else 0
    return worker_resources(n, gpus, cfg.run.threads, cluster, key)


def rank_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: this rank's part of the stage function ``config["stage"]`` (the process
    group is Ray Train's, which also set this worker's GPU). `config`: stage (a function such as
    ``stages.update``, pickled by name), run_dir, iteration, cpus, progress, upstream
    (:func:`launch_on_ray`)."""
    import torch

    from aepo_core.pipeline.processes import use_threads
    from aepo_core.pipeline.rundir import RunDir

    use_threads(config["cpus"])
    config["stage"](RunDir(Path(config["run_dir"])), config["iteration"],
                    show_progress=config["progress"] and torch.distributed.get_rank() == 0, checked=config["upstream"])


def launch_on_ray(stage: Callable[..., Any], cfg: Config, run_root: Path, iteration: int, nproc: int,
                  show_progress: bool = False, upstream: dict[str, str] | None = None) -> None:
    """Run `stage` (the update stage function) of `iteration` on `nproc` Ray Train workers of the
    cluster at run.ray_address (one GPU each where the cluster has GPUs and trainer.device allows)
    and wait for it. `upstream`: the stage's input digests, checked by the caller; each worker
    compares them with what it sees in the run directory (None: every worker checks them in full).

    Raises DistributedStageFailed naming the stage, the run, the iteration and the worker's error;
    UserError when the workers do not fit the cluster."""
    connect(cfg.run.ray_address)  # UserError when Ray is not installed or no cluster answers
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = cluster_resources_each(cfg, nproc, 1, "trainer.nproc")
    gpu = resources["GPU"] > 0
    name = stage.__name__
    trainer = TorchTrainer(
        rank_worker,
        train_loop_config={"stage": stage, "run_dir": str(Path(run_root).resolve()), "iteration": iteration,
                           "cpus": int(resources["CPU"]), "progress": show_progress, "upstream": upstream},
        scaling_config=ScalingConfig(num_workers=nproc, use_gpu=gpu, resources_per_worker={"CPU": resources["CPU"]}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        # no retries: a stage is re-run by the flow (or `aepo rerun-stage`), from its files; Ray Train's
        # own bookkeeping (no checkpoints) goes to a fresh folder of this machine's temp directory
        run_config=RunConfig(name=f"aepo-{name}-{iteration}-{uuid.uuid4().hex[:8]}",
                             storage_path=str(Path(tempfile.gettempdir()) / "aepo-ray-train"),
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=0)),
    )
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise DistributedStageFailed(
            f"the {name} stage of iteration {iteration} of {run_root} failed on {nproc} Ray Train workers "
            f"({cfg.run.ray_address}): {root_cause(str(exc))}") from None


@contextlib.contextmanager
def engine_actors(cfg: Config, model_path: Path, what: str) -> Iterator[Any]:
    """rollout.data_parallel engine actors on the cluster at run.ray_address, as one engine (RayEngine),
    killed on leaving the block. An actor's failure (start, model load, sampling) becomes
    DistributedStageFailed naming `what` ("the rollout stage of iteration 3 of runs/x")."""
    from aepo_core.io.engines.ray_actors import RayEngine

    ray = require_ray()
    connect(cfg.run.ray_address)
    n = cfg.rollout.data_parallel
    resources = cluster_resources_each(cfg, n, cfg.rollout.vllm.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1,
                                       "rollout.data_parallel")
    try:
        with RayEngine(cfg, model_path, n, resources) as engine:
            yield engine
    except ray.exceptions.RayError as exc:
        raise DistributedStageFailed(f"{what} failed on {n} Ray engine actors ({cfg.run.ray_address}): "
                                     f"{root_cause(str(exc))}") from None


@contextlib.contextmanager
def local_cluster(cpus: int) -> Iterator[str]:
    """A Ray cluster of one node on this machine with `cpus` CPUs, for trying the Ray path (the tests,
    benchmarks/stage_launchers.py): `ray start --head --block` as a child process, its address
    ("127.0.0.1:PORT"); stopped on leaving the block (that cluster only: not `ray stop`, which stops
    every Ray cluster of this user on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--num-cpus={cpus}",
                             f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(600):
            if head.poll() is not None:
                raise RuntimeError(f"ray start --head exited ({head.returncode}): {head.stderr.read().decode()[-2000:]}")
            if unreachable(address, timeout=1.0) is None:
                break
            time.sleep(0.5)
        yield address
    finally:
        import ray

        ray.shutdown()  # leave it before it stops
        head.terminate()  # --block: the head stops the cluster's processes on SIGTERM
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
