"""Runs side by side: one training iteration of two runs started at the same moment on one machine,
each with every core (torch's default: the cores in its affinity mask) against each with its share
(run.threads = cores / 2), and one run alone for reference.

    python benchmarks/side_by_side.py [--repeats 3] [--prompts 16] [--out benchmarks/results/side_by_side.json]

Each measurement is a fresh pair of processes (`--worker` below): each makes its own throwaway run of
the embedded default (AEPO, `--prompts` prompts x 8), runs iteration 0 as warm-up and times iteration 1
(common.run_iteration: the stage functions, no Prefect or MLflow). The two workers wait on a shared
start file so their measured iterations overlap. Reported: the median over repeats of each worker's
iteration seconds, and the ratio to the run alone with all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(root: Path, name: str, threads: int | None, prompts: int, go: Path) -> None:
    from common import make_run, run_iteration, setup_process

    from aepo_core.pipeline.processes import use_threads

    setup_process(None)
    used = use_threads(threads)  # what `aepo run` does with run.threads
    run = make_run(root, name, [f"rollout.prompts_per_batch={prompts}", "evaluation.every=1000"], iterations=2)
    run_iteration(run, 0)
    (root / f"{name}.ready").touch()
    while not go.exists():  # start the measured iteration together with the other worker
        time.sleep(0.01)
    result = run_iteration(run, 1)
    print(json.dumps({"name": name, "threads": used, "seconds": result.seconds["total"]}))


def measure(threads: int | None, count: int, prompts: int) -> list[float]:
    """Iteration seconds of `count` workers started together, each with `threads`."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        go = root / "go"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--root", str(root),
               "--prompts", str(prompts), "--go", str(go)] + (["--threads", str(threads)] if threads else [])
        env = dict(os.environ, PYTHONPATH=f"{HERE.parent}{os.pathsep}{HERE}")
        env.pop("OMP_NUM_THREADS", None)
        procs = [subprocess.Popen(cmd + ["--name", f"w{i}"], env=env, stdout=subprocess.PIPE, text=True)
                 for i in range(count)]
        while not all((root / f"w{i}.ready").exists() for i in range(count)):
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("a worker failed")
            time.sleep(0.05)
        go.touch()
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        return [o["seconds"] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "side_by_side.json")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--root", type=Path)
    ap.add_argument("--name")
    ap.add_argument("--go", type=Path)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.worker:
        worker(args.root, args.name, args.threads, args.prompts, args.go)
        return
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // 2)
    cases = {"one run alone, all cores": (None, 1), "two runs, all cores each": (None, 2),
             f"two runs, run.threads={share} each": (share, 2)}
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits every case alike
        for label, (threads, count) in cases.items():
            samples[label].extend(measure(threads, count, args.prompts))
    alone = statistics.median(samples["one run alone, all cores"])
    print(f"{cores} cores, {args.prompts} prompts x 8, {args.repeats} repeats (medians of every worker's iteration)")
    print("| case | median s | min | max | vs alone |\n|---|---|---|---|---|")
    rows = []
    for label, values in samples.items():
        med = statistics.median(values)
        rows.append({"case": label, "median_s": med, "min_s": min(values), "max_s": max(values), "vs_alone": med / alone})
        print(f"| {label} | {med:.2f} | {min(values):.2f} | {max(values):.2f} | {med / alone:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": cores, "prompts": args.prompts, "repeats": args.repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
