"""Run a sweep plan's runs N at a time through the stage functions, without Prefect or MLflow.

    python scripts/stage_loop.py --plan data/sweeps/adaptive-seeds.yaml --parallel 16   # a GPU box
    python scripts/stage_loop.py --plan data/sweeps/adaptive-seeds.yaml --arm pi-0.12 --parallel 2

For machines that have torch and the project's core libraries but no Prefect or MLflow (the lent
accelerator machine of docs/results.md, "Seeds of the adaptive controller on a GPU"), and for many
small runs at once, which `aepo sweep` (one run after another, each a Prefect flow) does not do. Each
run is one process with one CPU thread (OMP_NUM_THREADS=1, not stored in the run's config: several
torch processes with a thread per core each spin against each other), running the same stages in the
same order as the `train` flow (the starting policy's evaluation, then `aepo_core.pipeline.stages.
PIPELINE` iteration by iteration) on the same run directory, so a run resumes where it stopped and
`aepo run` can take it over later (and then `aepo compare` sees it). What it leaves out is the flow's
tracking: no MLflow run, no Prefect artifacts, no plots; read the run directories (each iteration's
entropy/controller.json, evaluate/_SUCCESS.json). Logs: <runs_root>/<name>.log, a header per start.
Exit status 1 when any run failed (its log says why); stopping this process stops its runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def train_one(overrides: list[str]) -> None:
    """One run, in this process: the train flow's stage loop without its tracking."""
    from aepo_core.pipeline.processes import use_threads
    from aepo_core.pipeline.stages import open_run

    run = open_run(None, None, None, overrides)
    use_threads(run.config().run.threads)
    run_iterations(run, range(run.config().run.iterations))


def run_iterations(run, iterations: range) -> None:
    """`iterations` of `run` (a RunDir whose writer lock this process holds), in this process: the
    starting policy's evaluation first where it is still due (as the flow's evaluate_base), then each
    iteration through the stage functions (stages.run_iteration; complete stages are skipped),
    pruning after each and printing a line each; the rollout engine and the writer lock are released
    at the end, whatever happens."""
    from aepo_core.io.engines import release_shared_engine
    from aepo_core.pipeline.retention import prune
    from aepo_core.pipeline.rundir import BASE_ITERATION
    from aepo_core.pipeline.stages import PIPELINE, base_evaluation_pending, run_iteration

    try:
        cfg = run.config()
        if base_evaluation_pending(run):
            PIPELINE["evaluate"](run, BASE_ITERATION)
        for i in iterations:
            started = time.perf_counter()
            run_iteration(run, i, lambda name, it: PIPELINE[name](run, it))
            prune(run, cfg, i)
            read = run.manifest(i, "entropy")["metrics"].get("entropy_read")
            print(f"iter {i:04d}/{cfg.run.iterations:04d} | H read {read} | {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        release_shared_engine()  # a vLLM engine's processes would otherwise outlive the run
        run.release_writer()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", help="sweep plan (YAML; aepo_core/pipeline/sweeps.py)")
    parser.add_argument("--arm", action="append", help="only this arm (repeatable)")
    parser.add_argument("--parallel", type=_positive, default=1, help="runs at once (one process and one thread each)")
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # a child: its overrides
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run (after the plan's)")
    args = parser.parse_args()
    if args.one is not None:
        train_one(args.one)
        return 0
    if not args.plan:
        parser.error("--plan is required")

    from aepo_core.config import load_config
    from aepo_core.pipeline.stages import run_root
    from aepo_core.pipeline.sweeps import read_plan, sweep_runs

    plan = read_plan(args.plan)
    runs = sweep_runs(plan["arms"], plan["seeds"], plan["overrides"], only=args.arm, where=args.plan)
    jobs = []
    for sweep_run in runs:  # every run's config first: a bad override fails before any run starts
        overrides = [*sweep_run.overrides, *args.overrides]
        jobs.append((sweep_run.name, overrides, run_root(load_config(None, overrides))))
    failed = run_children([(name, [__file__, "--one", *overrides], root.parent / f"{name}.log", " ".join(overrides))
                           for name, overrides, root in jobs], args.parallel)
    print(f"{len(runs) - len(failed)} of {len(runs)} runs finished" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def run_children(jobs: list[tuple[str, list[str], Path, str]], parallel: int) -> list[str]:
    """Run `jobs` (name, the Python script and its arguments, log file, what the log's header says)
    `parallel` at a time, each a process with one CPU thread; returns the names of those that failed.
    Each start appends a dated header to its log; stopping this process (SIGTERM too) stops them."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: run the finally below, stopping the runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pending, running, failed = list(jobs), [], []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, argv, log_path, header = pending.pop(0)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(log_path, "a")
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {header}\n")
                log.flush()
                proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((name, proc, log))
                print(f"started {name} (log {log.name})", flush=True)
            time.sleep(1)
            for item in [r for r in running if r[1].poll() is not None]:
                name, proc, log = item
                running.remove(item)
                log.close()
                print(f"{'finished' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} {name}", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    finally:  # stopped or broken: stop the runs too (each resumes on the next start)
        for _, proc, log in running:
            proc.terminate()
            proc.wait()
            log.close()
    return failed


if __name__ == "__main__":
    sys.exit(main())
