"""What the iteration benchmarks share (iteration_cost.py, scaling.py); not a script.

- `make_run`: a throwaway run directory of the embedded default plus overrides, created by
  `stages.init_run` exactly as `aepo run` would create it.
- `run_iteration`: one training iteration, the stage functions of `aepo_core.pipeline.stages` called directly
  in this process (no Prefect task, no MLflow tracking), without the evaluate stage; each stage timed
  with `time.perf_counter` around its call, so a stage's seconds include reading its inputs and
  publishing its outputs (parquet files, the policy checkpoint and optimiser state for update).
- `iteration0_batches`: the policy and regulariser batches of iteration 0 of an AEPO run, with its
  config, base policy, tokenizer and controller decision (the update benchmarks' input).
- `peak_rss`: peak resident memory of this process while a function runs (Linux: the kernel's
  high-water mark VmHWM, reset just before the call; elsewhere ru_maxrss, which cannot be reset).
- small helpers: process setup (threads, no progress bars), median/min/max, parameter counts, tables and JSON output.

The benchmarks are run as `python benchmarks/<name>.py`, which puts this folder on sys.path.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from aepo_core.config import load_config
from aepo_core.pipeline import stages
from aepo_core.pipeline.rundir import RunDir

# Evaluation is a separate cost (every evaluation.every iterations and at the end of a run); the
# benchmarks measure a training iteration, so this stage is never run, due or not.
EXCLUDED_STAGES = ("evaluate",)


def log_stderr(*parts: object) -> None:
    """For init_run's messages (e.g. building the base policy): stdout carries the results."""
    print(*parts, file=sys.stderr, flush=True)


def setup_process(threads: int | None) -> None:
    """Torch intra-op threads for this process and (through OMP_NUM_THREADS) its children; no
    transformers progress bars (one per checkpoint load and save would bury the results)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


# ----------------------------------------------------------------------------------- runs
def make_run(root: Path, name: str, overrides: Sequence[str], iterations: int) -> RunDir:
    """A new run directory `root/name` for the embedded default with `overrides` applied.

    run.iterations is set to the iterations the benchmark performs, so the stored config describes it."""
    cfg = load_config(None, [f"run.runs_root={root}", *overrides, f"run.iterations={iterations}"])
    return stages.init_run(cfg, Path(root) / name, log=log_stderr)


def training_stages(run: RunDir, iteration: int) -> list[str]:
    """The stages the train flow runs for `iteration`, in order, minus the excluded ones.

    stages_of adds evaluate when evaluation_due, which is also true for the run's last iteration
    whatever evaluation.every says, hence the explicit filter."""
    return [s for s in stages.stages_of(run.config(), iteration) if s not in EXCLUDED_STAGES]


@dataclass
class IterationResult:
    seconds: dict[str, float]  # stage -> seconds, and "total": the whole iteration
    metrics: dict[str, dict[str, Any]]  # stage -> the metrics its function returned (also in _SUCCESS.json)

    @property
    def generated_tokens(self) -> int:
        return int(self.metrics["rollout"]["tokens"])

    @property
    def responses(self) -> int:
        return int(self.metrics["rollout"]["responses"])

    @property
    def rows_trained(self) -> int:
        return int(self.metrics["update"]["rows_trained"])


def run_iteration(run: RunDir, iteration: int) -> IterationResult:
    """Run one iteration's training stages in this process; the previous iteration must be done."""
    names = training_stages(run, iteration)
    gc.collect()  # garbage of the previous iteration (or the other run) is not collected in the timing
    seconds: dict[str, float] = {}
    metrics: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        metrics[name] = stages.PIPELINE[name].run(run, iteration)
        seconds[name] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    return IterationResult(seconds, metrics)


# ----------------------------------------------------------------------------------- memory
def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise KeyError(key)


def max_rss_mib() -> float:
    """Peak resident memory over the process's whole life (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_rss(fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Call fn(); return (its result, memory record in MiB).

    The record holds `peak_mib` (highest resident memory of the process during the call),
    `before_mib`, `extra_mib` = peak - before and `method`. Meant for a fresh process per
    measurement: memory the allocator kept from earlier work and reuses is not counted as extra."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        resettable = True
    except OSError:
        resettable = False
    if resettable:
        before = _proc_status_mib("VmRSS")
        result = fn()
        peak = _proc_status_mib("VmHWM")
        method = "VmHWM reset by /proc/self/clear_refs before the call; extra = peak - VmRSS before"
    else:  # ru_maxrss cannot be reset: the peak may predate the call (then extra is 0)
        before = max_rss_mib()
        result = fn()
        peak = max_rss_mib()
        method = "ru_maxrss (whole process, not resettable); extra = ru_maxrss after - before"
    return result, {"peak_mib": peak, "before_mib": before, "extra_mib": peak - before, "method": method}


# ----------------------------------------------------------------------------------- reporting
def count_parameters(folder: str | Path) -> int:
    """Parameters of the HF checkpoint in `folder`, from the safetensors headers (nothing loaded).

    Tied embeddings are stored once, so this equals sum(p.numel() for p in model.parameters())."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                total += math.prod(fh.get_slice(key).get_shape())
    return total


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def print_table(columns: Sequence[tuple[str, str, str]], rows: Sequence[dict[str, Any]]) -> None:
    """columns: (header, row key, format spec such as '.3f'); a missing or None value prints '-'."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        cells.append([
            "-" if row.get(key) is None else format(row[key], spec) for _, key, spec in columns
        ])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        # first column left-aligned (names), the rest right-aligned (numbers)
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))))


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")
    return out


def iteration0_batches(prompts: int, n: int, root: Path, overrides: list[str]):
    """(config, base policy, tokenizer, policy batch, regulariser batch, decision) of iteration 0 of an
    AEPO run of the embedded default (below target: T_high, k > 0), sampled by the pipeline's stages."""
    import pyarrow.parquet as pq

    from aepo_core.config import load_config
    from aepo_core.io.engines import release_shared_engine
    from aepo_core.io.models import load_policy, load_tokenizer
    from aepo_core.pipeline import stages

    cfg = load_config(None, [f"rollout.prompts_per_batch={prompts}", f"rollout.n={n}", f"run.runs_root={root}",
                             *overrides])
    run = stages.init_run(cfg, root / "run", log=lambda *a: None)
    for stage in (stages.prepare, stages.rollout, stages.reward):
        stage(run, 0)
    run.release_writer()
    release_shared_engine()
    rollouts = pq.read_table(run.stage_dir(0, "rollout") / "rollouts.parquet")
    rewards = pq.read_table(run.stage_dir(0, "reward") / "rewards.parquet").column("reward").to_numpy()
    base = stages.policy_dir(run, 0)
    tokenizer = load_tokenizer(base)
    batches = stages.role_batches(rollouts, rewards, tokenizer.pad_token_id)
    decision = stages.controller_decision(run, cfg, 0)
    return cfg, load_policy(base), tokenizer, batches[stages.POLICY][1], batches[stages.REGULARISER][1], decision
