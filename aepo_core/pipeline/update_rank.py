"""One rank of the distributed update stage: `python -m aepo_core.pipeline.update_rank RUN_DIR ITERATION`,
started by torchrun (aepo_core.pipeline.distributed.launch_update), which sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from aepo_core.io.models import resolve_device
from aepo_core.pipeline import stages
from aepo_core.pipeline.distributed import ENTRY
from aepo_core.pipeline.processes import use_threads
from aepo_core.pipeline.rundir import RunDir


def rank_threads(threads: int | None, nproc: int) -> int:
    """A rank's torch threads: its share of run.threads (default: the cores this process may use)."""
    cores = threads or len(os.sched_getaffinity(0))
    return max(1, cores // nproc)


def main(argv: list[str] | None = None) -> None:
    """Join the process group (nccl on GPUs, one device per local rank; gloo on CPUs) and run the
    update stage's function as this rank."""
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY}", description="one rank of the distributed update stage")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("iteration", type=int)
    parser.add_argument("--progress", action="store_true", help="rank 0 shows a progress bar")
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    cfg = run.config(args.iteration)
    device = resolve_device(cfg.trainer)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    use_threads(rank_threads(cfg.run.threads, int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        stages.update(run, args.iteration, show_progress=args.progress and dist.get_rank() == 0)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
