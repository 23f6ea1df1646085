"""One rank of a stage on N processes: `python -m aepo_core.pipeline.stage_rank STAGE RUN_DIR ITERATION`,
started by torchrun (aepo_core.pipeline.distributed.launch_stage), which sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from aepo_core.io.engines import release_shared_engine
from aepo_core.io.models import resolve_device
from aepo_core.pipeline import stages
from aepo_core.pipeline.distributed import ENTRY, RANKED_STAGES
from aepo_core.pipeline.processes import rank_threads, use_threads
from aepo_core.pipeline.rundir import RunDir


def exit_rank(code: int = 0) -> NoReturn:
    """End a rank's process whose work is done and written: flush stdout and stderr, then
    ``os._exit(code)``, skipping the interpreter's finalization. Call it after
    ``dist.destroy_process_group()`` and after releasing anything that needs a clean shutdown (an
    engine's processes): atexit handlers do not run.

    Why: gloo's worker threads destroy each finished collective's work object, which can hold the
    last reference to a tensor's Python object; the decref takes the GIL, and a thread that asks for
    it while the interpreter is finalizing is ended by pthread_exit, whose unwinding through a
    noexcept frame calls std::terminate: SIGABRT at exit, after the rank's work was done, and torchrun
    then fails the stage (pytorch/pytorch#190489; here 5 of 164 runs of a 2-rank update on 2 cores,
    and once in CI). destroy_process_group() did not prevent it: the core dump shows gloo's worker
    threads still running after it (something, FSDP2's state likely, still holds the group). Without
    finalization the race cannot happen.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Join the process group and run the stage's function as this rank: one GPU per local rank
    where the stage runs on GPUs; nccl for the update's sharded tensors there, gloo otherwise (the
    rollout ranks exchange only their completions, as Python objects)."""
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY}", description="one rank of a stage on N processes")
    parser.add_argument("stage", choices=sorted(RANKED_STAGES))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("iteration", type=int)
    parser.add_argument("--progress", action="store_true", help="rank 0 shows a progress bar")
    parser.add_argument("--upstream", type=json.loads, default=None,
                        help="the stage's input digests as JSON, checked by the launcher (default: check them here)")
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    cfg = run.config(args.iteration)
    device = resolve_device(cfg.trainer)  # where the update trains and the HF engine samples
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    use_threads(rank_threads(cfg.run.threads, int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group("nccl" if device.type == "cuda" and args.stage == "update" else "gloo")
    stage = {"update": stages.update, "rollout": stages.rollout, "evaluate": stages.evaluate_stage}[args.stage]
    try:
        stage(run, args.iteration, show_progress=args.progress and dist.get_rank() == 0, checked=args.upstream)
    finally:
        release_shared_engine()  # an engine's processes stop with it, not at an exit that skips atexit
        dist.destroy_process_group()
    exit_rank(0)  # a failure above exits the usual way, with its traceback (and status 1 either way)


if __name__ == "__main__":
    main()
