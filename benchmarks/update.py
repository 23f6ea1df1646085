"""Update-step cost: variants of our update step on the same real batch, side by side.

One real AEPO iteration's inputs are made first (prepare, rollout and reward stages of a throwaway
run of the embedded default, in a temporary folder), then every variant performs the update on them,
alternating, each repeat on a fresh copy of the base policy and a fresh optimiser (copies are made
outside the timed region). The table gives median, min and max seconds, response tokens/s and the
ratio of medians to the first variant.

Variants (names for --variants):
    grpo-fp32-recompute   GRPO, float32, with the separate no-grad pass for pi_old's log-probs
                          (the behaviour before the single-mini-batch shortcut)
    grpo-fp32             GRPO, float32, one on-policy mini-batch: pi_old from the training pass
    grpo-bf16             as grpo-fp32 under bfloat16 autocast (CPU: fast with AVX512-BF16/AMX)
    aepo-fp32, aepo-bf16  AEPO (replace mode: k REINFORCE rows from the regulariser batch)

    python benchmarks/update.py [--prompts 32] [--n 8] [--repeats 5] [--variants a,b,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import iteration0_batches  # benchmarks/common.py (the script's folder is on sys.path)

from aepo_core.core.update import make_optimizer, update_step

VARIANTS = {
    # name: (algorithm, trainer.dtype, recompute_old_logprobs)
    "grpo-fp32-recompute": ("grpo", "float32", True),
    "grpo-fp32": ("grpo", "float32", None),
    "grpo-bf16": ("grpo", "bfloat16", None),
    "aepo-fp32": ("aepo", "float32", None),
    "aepo-bf16": ("aepo", "bfloat16", None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="grpo-fp32-recompute,grpo-fp32,grpo-bf16,aepo-fp32,aepo-bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/update.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.path=DIR")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")

    with tempfile.TemporaryDirectory() as tmp:
        cfg, pristine, _, policy_batch, reg_batch, controller = iteration0_batches(
            args.prompts, args.n, Path(tmp), args.overrides
        )
    print(
        f"batch: {len(policy_batch)} policy rows ({int(policy_batch.response_mask.sum())} response tokens), "
        f"{len(reg_batch) if reg_batch is not None else 0} regulariser rows at "
        f"T={float(reg_batch.temperatures[0]) if reg_batch is not None else '-'}; "
        f"{sum(p.numel() for p in pristine.parameters()):,} parameters, {torch.get_num_threads()} threads"
    )

    def run_variant(name: str) -> tuple[float, int]:
        algo, dtype, recompute = VARIANTS[name]
        policy = copy.deepcopy(pristine).train()
        trainer_cfg = cfg.trainer.model_copy(update={"dtype": dtype})
        optimizer = make_optimizer(policy, trainer_cfg)
        algo_cfg = cfg.algorithm.model_copy(update={"name": algo})
        t0 = time.perf_counter()
        result = update_step(
            policy, optimizer, policy_batch, reg_batch if algo == "aepo" else None, algo_cfg, trainer_cfg,
            controller, group_size=args.n, recompute_old_logprobs=recompute,
        )
        seconds = time.perf_counter() - t0
        return seconds, int(result.metrics["batch/response_tokens"])

    times: dict[str, list[float]] = {v: [] for v in names}
    tokens: dict[str, int] = {}
    for v in names:  # warm-up (allocator, kernels) outside the measurements
        run_variant(v)
    for _ in range(args.repeats):
        for v in names:
            seconds, tokens[v] = run_variant(v)
            times[v].append(seconds)

    base = statistics.median(times[names[0]])
    rows = []
    for v in names:
        med = statistics.median(times[v])
        rows.append(
            {
                "variant": v,
                "median_s": med,
                "min_s": min(times[v]),
                "max_s": max(times[v]),
                "response_tokens": tokens[v],
                "tokens_per_s": tokens[v] / med,
                f"ratio_to_{names[0]}": med / base,
            }
        )
    print(f"{'variant':22s} {'median s':>9s} {'min':>7s} {'max':>7s} {'tokens':>7s} {'tok/s':>8s} {'ratio':>6s}")
    for r in rows:
        print(
            f"{r['variant']:22s} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
            f"{r['response_tokens']:7d} {r['tokens_per_s']:8.0f} {r[f'ratio_to_{names[0]}']:6.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"prompts": args.prompts, "n": args.n, "repeats": args.repeats, "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
