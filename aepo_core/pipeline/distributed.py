"""Stages on N processes: torchrun, started by the stage function.

    flow process (Prefect task)                   torchrun --standalone --nproc_per_node N
      stages.<stage>(run, i) ── N > 1 ──►  rank 0 .. N-1: python -m aepo_core.pipeline.stage_rank STAGE RUN i
        waits; exit status and the ranks'          each: init_process_group, stages.<stage>(run, i) as
        stderr become the stage's error            this rank; rank 0 publishes the stage
        (DistributedStageFailed)

- update (``trainer.nproc``): the FSDP2-sharded policy, its micro-batches dealt to the ranks
  (aepo_core.core.ranks); rank 0 writes ``policy/`` and the manifest after the ranks have written
  the optimiser state (aepo_core.io.sharded) and met at a barrier.
- rollout and evaluate (``rollout.data_parallel``): one engine per rank, each sampling a contiguous
  shard of the requests, the completions gathered on every rank
  (aepo_core.io.engines.data_parallel); rank 0 writes the table and the manifest.

Every rank reads the same files and computes the same requests and batches, so the rename of the
stage's folder by rank 0 stays the commit point. The flow's process holds the run directory's
writer lock meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

from aepo_core.config import Config
from aepo_core.errors import UserError

ENTRY = "aepo_core.pipeline.stage_rank"  # the ranks' program (it imports the stages: its own module)
RANKED_STAGES = ("update", "rollout", "evaluate")  # the stages that can run on more than one process
_TAIL_BYTES = 64 * 1024  # of the ranks' stderr, kept for the error message


Placement = Literal["here", "torchrun", "ray_train", "ray_actors"]


def stage_processes(cfg: Config, stage: str) -> int:
    """How many processes `stage` asks for: ``trainer.nproc`` for the update, ``rollout.data_parallel``
    for rollout and evaluate, 1 for the other stages."""
    if stage == "update":
        return cfg.trainer.nproc
    return cfg.rollout.data_parallel if stage in RANKED_STAGES else 1


def placement(cfg: Config, stage: str, world: int) -> Placement:
    """Where `stage` runs, decided here only, as seen from a process in a group of `world` ranks:

    - "here": in this process — one process asked for, or this process is already one of the ranks;
    - "torchrun": on ``stage_processes`` ranks started by torchrun on this machine (no run.ray_address);
    - "ray_train": with run.ray_address, the update on Ray Train workers;
    - "ray_actors": with run.ray_address, rollout or evaluate in this process, sampling through
      ``rollout.data_parallel`` engine actors on the cluster.
    """
    if stage_processes(cfg, stage) == 1 or world > 1:
        return "here"
    if cfg.run.ray_address is None:
        return "torchrun"
    return "ray_train" if stage == "update" else "ray_actors"


class DistributedStageFailed(UserError):
    """A stage's torchrun processes failed; the message names the stage, the run, the iteration and
    the ranks' error."""


def torchrun_command(stage: str, run_dir: Path, iteration: int, nproc: int, progress: bool = False,
                     upstream: dict[str, str] | None = None) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m aepo_core.pipeline.stage_rank STAGE RUN ITERATION`,
    with this interpreter (``python -m torch.distributed.run`` is torchrun); `upstream`: the stage's
    input digests, checked by the caller (``--upstream JSON``; without it every rank checks them)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", ENTRY, stage, str(run_dir), str(iteration)] + (["--progress"] if progress else []) + (
            ["--upstream", json.dumps(upstream, sort_keys=True)] if upstream is not None else [])


def root_cause(stderr: str) -> str:
    """The last exception line a rank printed ("ValueError: ..."), torchrun's own wrappers left out;
    the last non-empty line when there is none."""
    errors = [line.strip() for line in stderr.splitlines()
              if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Fault|Busy|Failed|Artifact|Stage)\b.*", line.strip())
              and "ChildFailedError" not in line and "torch.distributed.elastic" not in line]
    if errors:
        return errors[-1]
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def launch_stage(stage: str, run_root: Path, iteration: int, nproc: int, show_progress: bool = False,
                 upstream: dict[str, str] | None = None) -> None:
    """Run `stage` (one of RANKED_STAGES) of `iteration` on `nproc` processes and wait for it.

    The ranks' stderr is passed through as it comes (warnings, progress) and its tail kept: a
    non-zero exit status raises DistributedStageFailed naming the stage, the run directory, the
    iteration, the exit status and the ranks' error. The ranks inherit this process's environment
    (PYTHONPATH, OMP_NUM_THREADS, AEPO_* settings).
    """
    cmd = torchrun_command(stage, run_root, iteration, nproc, show_progress, upstream)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = b""
    out = getattr(sys.stderr, "buffer", None)
    while chunk := os.read(proc.stderr.fileno(), 8192):
        if out is not None:
            out.write(chunk)
            out.flush()
        tail = (tail + chunk)[-_TAIL_BYTES:]
    status = proc.wait()
    if status != 0:
        text = tail.decode(errors="replace")
        raise DistributedStageFailed(
            f"the {stage} stage of iteration {iteration} of {run_root} failed on {nproc} processes (torchrun exit "
            f"status {status}): {root_cause(text)}\n(command: {' '.join(cmd)}; the ranks' full output is above)"
        )
