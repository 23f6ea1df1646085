"""The ranked stages as the flow calls them: in the flow's process, on 2 torchrun ranks, and on a
local Ray cluster (2 Ray Train workers for the update, 2 engine actors for the rollout).

For each way, a run of the embedded default (iteration 0, --prompts x --n policy rows, AEPO's
regulariser rows) is prepared, then the rollout stage function and (after the reward stage) the
update stage function are called --repeats times each, their published folder removed before each
call: the wall time of one call from the flow's view is what an iteration pays, i.e. the work plus,
for the ranks, the process or actor start, the model (and optimiser) load and the gather. Reported:
medians (min-max), the ratio to one process, and the stage's own measure of its work
(generate_seconds, step_seconds) so that the launch overhead is the difference.

One process reuses its engine across calls (shared_engine, as the flow does across iterations); the
ranks and the actors are started afresh for every call (as every iteration starts them). Threads:
every process gets one torch thread (run.threads=1), so 2 ranks use twice the cores of one process.
The rollout tables of the three ways are checked equal (rows, tokens, texts).

    python benchmarks/stage_launchers.py [--prompts 16] [--n 8] [--repeats 3] [--ray-address HOST:PORT]

Without --ray-address a local cluster of 2 CPUs is started (ray_cluster.local_cluster) and stopped after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_run, print_table, setup_process, spread, write_json  # noqa: E402


def timed_calls(run, stage_fn, stage: str, repeats: int, inner_key: str) -> dict:
    """`repeats` calls of stage_fn(run, 0), the stage's folder removed before each: wall seconds and
    the stage's own measure of its work (`inner_key` of its metrics)."""
    walls, inner = [], []
    for _ in range(repeats):
        shutil.rmtree(run.stage_dir(0, stage), ignore_errors=True)
        started = time.perf_counter()
        metrics = stage_fn(run, 0)
        walls.append(time.perf_counter() - started)
        inner.append(float(metrics[inner_key]))
    return {"wall": spread(walls), "inner": spread(inner), "walls": walls}


def measure(address: str, args) -> tuple[list[dict], dict]:
    """Each way's timed calls and its rollout table (without log-probs)."""
    import pyarrow.parquet as pq

    from aepo_core.io.engines import release_shared_engine
    from aepo_core.pipeline import stages

    two = ["trainer.nproc=2", "rollout.data_parallel=2"]
    ways = {"1 process": [], "torchrun, 2 ranks": two, "Ray, 2 workers/actors": [*two, f"run.ray_address={address}"]}
    base = [f"rollout.prompts_per_batch={args.prompts}", f"rollout.n={args.n}", "run.threads=1"]
    root = Path(tempfile.mkdtemp(prefix="aepo-launchers-"))
    rows, tables = [], {}
    try:
        for i, (name, overrides) in enumerate(ways.items()):
            run = make_run(root, f"way{i}", [*base, *overrides], 1)
            try:
                stages.prepare(run, 0)
                rollout = timed_calls(run, stages.rollout, "rollout", args.repeats, "generate_seconds")
                tables[name] = pq.read_table(run.stage_dir(0, "rollout") / "rollouts.parquet").drop(["logprobs"])
                stages.reward(run, 0)
                update = timed_calls(run, stages.update, "update", args.repeats, "step_seconds")
            finally:
                run.release_writer()
                release_shared_engine()
            rows.append({"way": name, "rollout": rollout, "update": update})
            print(f"{name}: rollout {rollout['walls']}, update {update['walls']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray-address", default=None, help="an existing cluster (default: start a local one)")
    parser.add_argument("--out", default="benchmarks/results/stage_launchers.json")
    args = parser.parse_args()
    setup_process(1)
    os.environ["OMP_NUM_THREADS"] = "1"

    from aepo_core.pipeline.ray_cluster import local_cluster

    with contextlib.nullcontext(args.ray_address) if args.ray_address else local_cluster(cpus=2) as address:
        rows, tables = measure(address, args)
    first = next(iter(tables.values()))
    same = {name: t.equals(first) for name, t in tables.items()}
    one = rows[0]
    table = [{
        "way": r["way"],
        "rollout_wall": r["rollout"]["wall"]["median"], "rollout_ratio": r["rollout"]["wall"]["median"] / one["rollout"]["wall"]["median"],
        "generate": r["rollout"]["inner"]["median"],
        "update_wall": r["update"]["wall"]["median"], "update_ratio": r["update"]["wall"]["median"] / one["update"]["wall"]["median"],
        "step": r["update"]["inner"]["median"],
        "same": same[r["way"]],
    } for r in rows]
    print_table([("way", "way", "s"), ("rollout stage s", "rollout_wall", ".2f"), ("/1 process", "rollout_ratio", ".2f"),
                 ("of which sampling s", "generate", ".2f"), ("update stage s", "update_wall", ".2f"),
                 ("/1 process", "update_ratio", ".2f"), ("of which step s", "step", ".2f"),
                 ("same rollout table", "same", "")], table)
    write_json(args.out, {"args": vars(args), "ways": rows, "summary": table})


if __name__ == "__main__":
    main()
