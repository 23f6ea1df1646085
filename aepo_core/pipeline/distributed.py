"""The update stage on N processes (``trainer.nproc`` > 1): torchrun, started by the stage function.

    flow process (Prefect task "update")            torchrun --standalone --nproc_per_node N
      stages.update(run, i)  ── nproc > 1 ──►  rank 0 .. N-1: python -m aepo_core.pipeline.distributed RUN i
        waits; exit status and the ranks'         each: init_process_group (gloo on CPU, nccl on GPU),
        stderr become the stage's error           stages.update(run, i) with the FSDP2-sharded policy;
        (DistributedStageFailed)                  rank 0 publishes the stage (policy/, manifest)

Every rank reads the same files and computes the same batch; the micro-batches are dealt to the
ranks (aepo_core.core.ranks); rank 0 writes ``policy/`` and the manifest after the ranks have written
the optimiser state (aepo_core.io.sharded) and met at a barrier, so the rename of the stage's folder
stays the commit point. The flow's process holds the run directory's writer lock meanwhile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from aepo_core.errors import UserError

ENTRY = "aepo_core.pipeline.distributed"
_TAIL_BYTES = 64 * 1024  # of the ranks' stderr, kept for the error message


class DistributedStageFailed(UserError):
    """The update stage's torchrun processes failed; the message names the run, the iteration and
    the ranks' error."""


def torchrun_command(run_dir: Path, iteration: int, nproc: int, progress: bool = False) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m aepo_core.pipeline.distributed RUN ITERATION`,
    with this interpreter (``python -m torch.distributed.run`` is torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", ENTRY, str(run_dir), str(iteration)] + (["--progress"] if progress else [])


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


def launch_update(run_root: Path, iteration: int, nproc: int, show_progress: bool = False) -> None:
    """Run the update stage of `iteration` on `nproc` processes and wait for it.

    The ranks' stderr is passed through as it comes (warnings, progress) and its tail kept: a
    non-zero exit status raises DistributedStageFailed naming the run directory, the iteration, the
    exit status and the ranks' error. The ranks inherit this process's environment (PYTHONPATH,
    OMP_NUM_THREADS, AEPO_* settings).
    """
    cmd = torchrun_command(run_root, iteration, nproc, show_progress)
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
            f"the update of iteration {iteration} of {run_root} failed on {nproc} processes (torchrun exit "
            f"status {status}): {root_cause(text)}\n(command: {' '.join(cmd)}; the ranks' full output is above)"
        )


def rank_threads(threads: int | None, nproc: int) -> int:
    """A rank's torch threads: its share of run.threads (default: the cores this process may use)."""
    cores = threads or len(os.sched_getaffinity(0))
    return max(1, cores // nproc)


def main(argv: list[str] | None = None) -> None:
    """One rank of the distributed update stage (started by torchrun, which sets RANK, WORLD_SIZE,
    LOCAL_RANK and the rendezvous address)."""
    import torch
    import torch.distributed as dist

    from aepo_core.io.models import resolve_device
    from aepo_core.pipeline import stages
    from aepo_core.pipeline.processes import use_threads
    from aepo_core.pipeline.rundir import RunDir

    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY}", description=__doc__.splitlines()[0])
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
