"""The update on 1 and 2 processes (trainer.nproc): step time and peak memory per rank, and what the
per-iteration restart of the trainer costs.

One real AEPO iteration's inputs are made first (prepare, rollout and reward stages of a throwaway run
of the embedded default: `common.iteration0_batches`). Then, for each N, `torchrun --standalone
--nproc_per_node N` starts this script as the ranks, as the update stage does
(aepo_core.pipeline.distributed); N = 1 runs the single-process path (no process group, no FSDP2),
N > 1 the sharded one. Each rank:

- records when it is ready (interpreter started, torch/transformers/aepo imported, process group up):
  the process start, from the driver's launch;
- loads the base policy (and shards it: FSDP2 on each decoder layer and the root): the model load;
- takes one update step (warm-up), writes the optimiser state as its update stage would
  (optimizer.pt for 1 process, a torch.distributed.checkpoint folder for N), and loads it into a
  fresh optimiser: the optimiser load;
- takes --repeats update steps on the batch, timed, its peak resident memory measured over them
  (VmHWM, reset before the first).

Reported: median step seconds (the slowest rank's each step), the ratio to N = 1, peak RSS per rank,
and the restart (process start + model load + optimiser load) as a share of the median step. The
restart grows with the model (loading and gathering weights), the step with the batch.

    python benchmarks/distributed.py [--prompts 16] [--n 8] [--repeats 5] [--nproc 1,2] [--out FILE]

Threads: each rank runs --threads torch threads (default 1), so N ranks use N times the cores of one
process (as N GPUs are N times one GPU).
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


def worker(case_path: str) -> None:
    """One rank (started by torchrun): see the module docstring."""
    import torch
    import torch.distributed as dist

    from aepo_core.core.ranks import Ranks
    from aepo_core.core.update import make_optimizer, update_step
    from aepo_core.io.models import load_policy
    from aepo_core.io.sharded import (
        OPTIMIZER_DCP,
        OPTIMIZER_FILE,
        load_optimizer,
        save_optimizer,
        shard_policy,
    )
    from aepo_core.pipeline.stage_rank import exit_rank

    sys.path.insert(0, str(HERE))
    from common import peak_rss

    case = torch.load(case_path, weights_only=False)
    torch.set_num_threads(case["threads"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    ready_at = time.time()
    ranks = Ranks.current()
    cfg = case["cfg"]

    t0 = time.perf_counter()
    policy = load_policy(case["base"])
    if world > 1:
        policy = shard_policy(policy, torch.device("cpu"))
    policy.train()
    model_load = time.perf_counter() - t0

    def step(optimizer) -> float:
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        update_step(policy, optimizer, case["policy_batch"], case["regulariser_batch"], cfg.algorithm, cfg.trainer,
                    case["decision"], group_size=cfg.rollout.n, ranks=ranks)
        return time.perf_counter() - t

    optimizer = make_optimizer(policy, cfg.trainer)
    step(optimizer)  # warm-up; also gives the optimiser state to save and load
    folder = Path(case["scratch"]) / f"world{world}"
    if world > 1:
        save_optimizer(policy, optimizer, folder / OPTIMIZER_DCP)
        dist.barrier()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    optimizer = make_optimizer(policy, cfg.trainer)
    t0 = time.perf_counter()
    load_optimizer(policy, optimizer, folder)
    optimizer_load = time.perf_counter() - t0

    steps, memory = peak_rss(lambda: [step(optimizer) for _ in range(case["repeats"])])
    record = {"rank": ranks.rank, "ready_at": ready_at, "model_load_s": model_load, "optimizer_load_s": optimizer_load,
              "steps_s": steps, "peak_rss_mib": memory["peak_mib"], "extra_rss_mib": memory["extra_mib"]}
    Path(case["out"] + f".rank{ranks.rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()
        exit_rank(0)  # as a stage's rank (aepo_core.pipeline.stage_rank.exit_rank)


def measure(case_path: Path, case: dict, nproc: int) -> dict:
    """Launch the ranks as the update stage does, wait, and summarise their records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", str(case_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"])}
    launched = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nproc={nproc} failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads(Path(case["out"] + f".rank{r}.json").read_text()) for r in range(nproc)]
    steps = [max(r["steps_s"][i] for r in ranks) for i in range(case["repeats"])]  # the slowest rank's
    start = max(r["ready_at"] for r in ranks) - launched
    model_load = max(r["model_load_s"] for r in ranks)
    optimizer_load = max(r["optimizer_load_s"] for r in ranks)
    median = statistics.median(steps)
    return {
        "nproc": nproc,
        "step_median_s": median,
        "step_min_s": min(steps),
        "step_max_s": max(steps),
        "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in ranks],
        "extra_rss_mib_per_rank": [r["extra_rss_mib"] for r in ranks],
        "process_start_s": start,
        "model_load_s": model_load,
        "optimizer_load_s": optimizer_load,
        "restart_s": start + model_load + optimizer_load,
        "restart_share_of_step": (start + model_load + optimizer_load) / median,
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default="benchmarks/results/distributed.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.dtype=float32")
    args = parser.parse_args()
    import torch
    from common import iteration0_batches, print_table, setup_process, write_json

    setup_process(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg, policy, _, policy_batch, reg_batch, decision = iteration0_batches(args.prompts, args.n, tmp, args.overrides)
        base = tmp / "base"
        policy.save_pretrained(str(base))
        del policy
        tokens = int(policy_batch.response_mask.sum())
        print(f"batch: {len(policy_batch)} policy rows ({tokens} response tokens), "
              f"{len(reg_batch) if reg_batch is not None else 0} regulariser rows; trainer.dtype={cfg.trainer.dtype}, "
              f"{args.threads} thread(s) per rank")
        rows = []
        for nproc in [int(x) for x in args.nproc.split(",")]:
            case = {"cfg": cfg, "base": str(base), "policy_batch": policy_batch, "regulariser_batch": reg_batch,
                    "decision": decision, "repeats": args.repeats, "threads": args.threads,
                    "scratch": str(tmp / "scratch"), "out": str(tmp / f"out{nproc}")}
            case_path = tmp / f"case{nproc}.pt"
            torch.save(case, case_path)
            rows.append(measure(case_path, case, nproc))
    first = rows[0]["step_median_s"]
    for row in rows:
        row["step_ratio_to_first"] = row["step_median_s"] / first
        row["peak_rss_mib_max_rank"] = max(row["peak_rss_mib_per_rank"])
    print_table([("nproc", "nproc", "d"), ("step median s", "step_median_s", ".3f"), ("min", "step_min_s", ".3f"),
                 ("max", "step_max_s", ".3f"), ("ratio", "step_ratio_to_first", ".2f"),
                 ("peak RSS MiB/rank", "peak_rss_mib_max_rank", ".0f"), ("start s", "process_start_s", ".2f"),
                 ("model load s", "model_load_s", ".3f"), ("optim load s", "optimizer_load_s", ".3f"),
                 ("restart/step", "restart_share_of_step", ".2f")], rows)
    meta = {"prompts": args.prompts, "n": args.n, "repeats": args.repeats, "threads_per_rank": args.threads,
            "response_tokens": tokens, "overrides": args.overrides, "cpus": os.cpu_count()}
    write_json(args.out, {"config": meta, "rows": rows})


if __name__ == "__main__":
    main()
