"""Cost of entropy control: the wall time of one training iteration, AEPO vs GRPO, same config.

    python benchmarks/iteration_cost.py [--prompts 32] [--iterations 6] [--threads N]
                                        [--out benchmarks/results/iteration_cost.json] [overrides ...]

The workload is the embedded default (32 prompts x 8 responses, <= 48 new tokens, the 3.2 M-parameter
base policy) with --prompts and any dotted config overrides (e.g. rollout.n=4 trainer.dtype=float32).
Two throwaway runs in a temporary folder differ only in algorithm.name (aepo, grpo): same seeds, so
iteration 0 samples the same prompts; later iterations diverge as the policies do.

What is timed. One iteration is the training stages prepare, rollout, reward, update, entropy, each
the plain stage function of aepo_core.pipeline.stages called in this process (common.run_iteration: no
Prefect, no MLflow, no evaluate stage), timed around the call: it includes reading inputs and
publishing outputs (parquet files, the policy checkpoint and optimiser state). Both runs train side by
side in one process: for each iteration i, GRPO's iteration i and AEPO's iteration i, in alternating
order (GRPO first on even i). They share the process's rollout engine (same engine settings), which
loads the sampling run's latest policy at each rollout, as every training iteration does. Iteration 0
is warm-up (engine start, allocator, first kernels) and left out of the statistics.

What differs in the work. AEPO's rollout also samples its regulariser batch, the first
algorithm.reg_prompt_fraction of the prompts (default 1/4) x n at the controller's temperature, in the
same engine call as the policy batch (about 25 % more responses); in the default combine mode
'replace' its update trains as many rows as GRPO's (k REINFORCE rows replace k GRPO rows).

Reported per side: median, min and max of the iteration's total seconds, the median of each stage,
the median generated tokens (the rollout stage's `tokens` metric: both batches, up to and including
EOS) and rows trained; and the ratios AEPO / GRPO of the medians. The project's target for the total
is <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import IterationResult, make_run, print_table, run_iteration, setup_process, spread, write_json

from aepo_core.io.engines import release_shared_engine

SIDES = ("grpo", "aepo")  # the ratio is aepo / grpo
TARGET_RATIO = 1.10


def train_side_by_side(root: Path, overrides: list[str], iterations: int) -> dict[str, list[IterationResult]]:
    """Both runs, iteration by iteration, alternating which side goes first."""
    runs = {side: make_run(root, side, [*overrides, f"algorithm.name={side}"], iterations) for side in SIDES}
    results: dict[str, list[IterationResult]] = {side: [] for side in SIDES}
    try:
        for i in range(iterations):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                result = run_iteration(runs[side], i)
                results[side].append(result)
                print(f"iter {i} {side}: {result.seconds['total']:.2f}s "
                      f"({result.generated_tokens} tokens, {result.rows_trained} rows trained)", flush=True)
    finally:
        release_shared_engine()
    return results


def summarise(results: list[IterationResult], first_iteration: int) -> dict:
    """Statistics of one side over the measured iterations, `results[0]` being `first_iteration`."""
    stage_names = [s for s in results[0].seconds if s != "total"]
    return {
        "total_s": spread([r.seconds["total"] for r in results]),
        "stage_median_s": {s: statistics.median(r.seconds[s] for r in results) for s in stage_names},
        "generated_tokens_median": statistics.median(r.generated_tokens for r in results),
        "responses": results[0].responses,
        "rows_trained": results[0].rows_trained,
        "per_iteration": [
            {"iteration": i, "seconds": r.seconds, "generated_tokens": r.generated_tokens}
            for i, r in enumerate(results, start=first_iteration)
        ],
    }


def table_rows(summary: dict[str, dict]) -> list[dict]:
    """One row per side, keyed for print_table; `ratio` is the side's median over GRPO's."""
    base = summary["grpo"]["total_s"]["median"]
    rows = []
    for side in SIDES:
        s = summary[side]
        rows.append({
            "side": side, **s["total_s"], "ratio": s["total_s"]["median"] / base,
            **s["stage_median_s"], "tokens": s["generated_tokens_median"], "responses": s["responses"], "rows": s["rows_trained"],
        })
    return rows


def stage_ratios(summary: dict[str, dict]) -> dict[str, float | None]:
    """AEPO / GRPO of each stage's median seconds, and of the generated tokens."""
    a, g = summary["aepo"], summary["grpo"]
    ratios = {
        stage: a["stage_median_s"][stage] / g["stage_median_s"][stage] if g["stage_median_s"][stage] else None
        for stage in g["stage_median_s"]
    }
    ratios["generated_tokens"] = a["generated_tokens_median"] / g["generated_tokens_median"]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="rollout.prompts_per_batch")
    parser.add_argument("--iterations", type=int, default=6, help="per side, the first one is warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/iteration_cost.json")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.n=4")
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (iteration 0 is warm-up)")
    setup_process(args.threads)
    overrides = [f"rollout.prompts_per_batch={args.prompts}", *args.overrides]

    with tempfile.TemporaryDirectory(prefix="aepo-iteration-cost-") as tmp:
        results = train_side_by_side(Path(tmp), overrides, args.iterations)
    summary = {side: summarise(results[side][1:], first_iteration=1) for side in SIDES}  # 0: warm-up
    rows = table_rows(summary)
    ratio = rows[1]["ratio"]
    per_stage = stage_ratios(summary)

    print(f"\nworkload: {args.prompts} prompts, overrides {args.overrides or 'none'}; "
          f"{args.iterations - 1} measured iterations per side (iteration 0 = warm-up), "
          f"torch threads {torch.get_num_threads()}")
    print_table(
        [("side", "side", ""), ("median s", "median", ".3f"), ("min s", "min", ".3f"), ("max s", "max", ".3f"),
         ("ratio", "ratio", ".3f"), *[(f"{stage} s", stage, ".3f") for stage in summary["grpo"]["stage_median_s"]],
         ("gen tokens", "tokens", ".0f"), ("responses", "responses", "d"), ("rows trained", "rows", "d")],
        rows,
    )
    print("AEPO / GRPO of the medians per stage: "
          + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in per_stage.items()))
    verdict = "within" if ratio <= TARGET_RATIO else "ABOVE"
    print(f"AEPO / GRPO median iteration seconds: {ratio:.3f} ({verdict} the target <= {TARGET_RATIO:.2f})")

    write_json(args.out, {
        "args": vars(args),
        "torch_threads": torch.get_num_threads(),
        "measured_iterations": list(range(1, args.iterations)),
        "sides": summary,
        "ratio_aepo_over_grpo": ratio,
        "stage_ratios_aepo_over_grpo": per_stage,
        "target_ratio": TARGET_RATIO,
    })


if __name__ == "__main__":
    main()
