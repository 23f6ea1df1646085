"""Scaling: iteration time and peak memory against prompts per batch and against model size.

    python benchmarks/scaling.py [--prompts-grid 32,64,128,256] [--models-grid 3M,20M,80M]
                                 [--model-prompts 32] [--max-new-tokens 48] [--threads N]
                                 [--timeout 3600] [--dry-run] [--out benchmarks/results/scaling.json]
                                 [overrides ...]

Two axes, each point one training iteration of the embedded default (AEPO, n = 8) with that change:
  (a) prompts: rollout.prompts_per_batch = each value of --prompts-grid, on the embedded 3.2 M-parameter
      base policy (partly trained: it stops at EOS, so responses are shorter than the token budget);
  (b) model: a randomly initialised Qwen2 of each size in --models-grid at --model-prompts prompts,
      written to a temporary folder with the embedded tokenizer and generation settings (copied from
      the base policy's folder) and used as model.path. Shapes keep the base recipe's proportions (head
      dim 64, MLP 3 x hidden, tied embeddings); the sizes are names of MODEL_SHAPES, and the table prints
      the actual parameter counts. A random policy rarely emits EOS (about 1 in 270 tokens), so nearly
      every response runs to the token budget.
Both axes share --max-new-tokens and the dotted config overrides.

Each point runs in a fresh subprocess (so its peak memory is its own): it creates a throwaway run,
runs iteration 0 as warm-up and iteration 1 measured, each being the stages prepare, rollout, reward,
update, entropy called in-process (common.run_iteration: no Prefect, no MLflow, no evaluate). Reported
for iteration 1: the stage seconds, the generated tokens (rollout's `tokens` metric: policy and
regulariser batches, up to and including EOS), seconds per 1k generated tokens, and `vs smallest`:
that rate relative to the smallest point of the same axis (1.0 = the iteration time grows exactly in
proportion to the generated tokens). Memory: `peak MiB` is the process's highest resident memory during
iteration 1 (VmHWM, reset just before it; see common.peak_rss), `+MiB` how much of it iteration 1
added to what the process held before; `max RSS` is ru_maxrss over the whole subprocess.
One measured iteration per point: these are single samples, not medians (the scaling trend is the
point; use iteration_cost.py for a ratio of medians).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    count_parameters,
    make_run,
    max_rss_mib,
    peak_rss,
    print_table,
    run_iteration,
    setup_process,
    write_json,
)
from transformers import AutoTokenizer

from aepo_core.config import load_config
from aepo_core.io.engines import release_shared_engine
from aepo_core.pipeline.sources import resolve_model_path
from aepo_core.task.base_policy import BaseRecipe, build_model

# name -> BaseRecipe fields changed from the embedded base recipe (hidden 256, 4 layers, 4 heads,
# 2 KV heads, intermediate 768: 3.2 M parameters with the embedded vocabulary).
MODEL_SHAPES = {
    "3M": {},
    "20M": {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1536},
    "80M": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4, "intermediate_size": 2304},
}
# What the built model writes itself; every other file of the base folder (tokenizer files, chat
# template, generation_config.json) is copied, so sampling and EOS handling match the base policy.
MODEL_FILES = {"config.json", "model.safetensors", "aepo_base.json"}


# ----------------------------------------------------------------------------------- model axis
def build_random_policy(size: str, base_folder: Path, dest: Path) -> Path:
    """A randomly initialised policy of shape MODEL_SHAPES[size] as an HF folder `dest/random-<size>`."""
    recipe = dataclasses.replace(BaseRecipe(), **MODEL_SHAPES[size])
    tokenizer = AutoTokenizer.from_pretrained(str(base_folder))
    model = build_model(recipe, tokenizer)  # the project's builder: same config as the base, seeded
    folder = dest / f"random-{size}"
    model.save_pretrained(str(folder), safe_serialization=True)
    for path in base_folder.iterdir():
        if path.is_file() and path.name not in MODEL_FILES:
            shutil.copy2(path, folder / path.name)  # after save_pretrained: the base's generation_config wins
    return folder


def grid_points(args: argparse.Namespace, model_folders: dict[str, Path]) -> list[dict]:
    """Every point to measure: axis, value and the config overrides that make it."""
    points = [
        {"axis": "prompts", "value": str(p), "overrides": [f"rollout.prompts_per_batch={p}"]}
        for p in parse_grid(args.prompts_grid)
    ]
    points += [
        {"axis": "model", "value": size,
         "overrides": [f"model.path={folder}", f"rollout.prompts_per_batch={args.model_prompts}"]}
        for size, folder in model_folders.items()
    ]
    shared = [f"rollout.max_new_tokens={args.max_new_tokens}", *args.overrides]
    for point in points:
        point["overrides"] = shared + point["overrides"]
    return points


def parse_grid(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------------- one point
def measure_point(overrides: list[str], root: Path) -> dict:
    """In the point's subprocess: a throwaway run under `root`, iteration 0 (warm-up), iteration 1 measured."""
    run = make_run(root, "run", overrides, iterations=2)
    run_iteration(run, 0)
    result, memory = peak_rss(lambda: run_iteration(run, 1))
    params = count_parameters(run.read_json("base.json")["path"])
    release_shared_engine()
    return {
        "params": params,
        "seconds": result.seconds,
        "generated_tokens": result.generated_tokens,
        "responses": result.responses,
        "rows_trained": result.rows_trained,
        "memory_iteration_1": memory,
        "max_rss_mib": max_rss_mib(),
        "torch_threads": torch.get_num_threads(),
    }


def run_point(point: dict, args: argparse.Namespace) -> dict:
    """Measure one point in a fresh interpreter running this script with --point; never raises.

    The run directory belongs to this process, so it is removed even when the child is killed."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aepo-scaling-point-") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(point["overrides"]),
               "--point-dir", tmp]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {**point, "error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        return {**point, "error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    measured = json.loads(done.stdout.strip().splitlines()[-1])  # the last line is the result
    return {**point, **measured, "subprocess_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------------- report
def add_rates(results: list[dict]) -> None:
    """Seconds per 1k generated tokens, and that rate relative to the axis's smallest point."""
    for r in results:
        if "error" not in r:
            r["s_per_1k_tokens"] = 1000 * r["seconds"]["total"] / r["generated_tokens"]
    for axis in ("prompts", "model"):
        done = [r for r in results if r["axis"] == axis and "error" not in r]
        if not done:
            continue
        # smallest = fewest prompts on the prompts axis, fewest parameters on the model axis
        smallest = min(done, key=lambda r: int(r["value"]) if axis == "prompts" else r["params"])
        for r in done:
            r["vs_smallest"] = r["s_per_1k_tokens"] / smallest["s_per_1k_tokens"]


def table_row(r: dict) -> dict:
    if "error" in r:
        return {"axis": r["axis"], "value": r["value"]}
    s, mem = r["seconds"], r["memory_iteration_1"]
    return {
        "axis": r["axis"], "value": r["value"], "params": r["params"] / 1e6, "tokens": r["generated_tokens"],
        "rollout": s["rollout"], "update": s["update"], "total": s["total"], "rate": r["s_per_1k_tokens"],
        "vs": r["vs_smallest"], "peak": mem["peak_mib"], "extra": mem["extra_mib"], "maxrss": r["max_rss_mib"],
    }


COLUMNS = [
    ("axis", "axis", ""), ("value", "value", ""), ("params M", "params", ".1f"), ("gen tokens", "tokens", "d"),
    ("rollout s", "rollout", ".2f"), ("update s", "update", ".2f"), ("total s", "total", ".2f"),
    ("s/1k tok", "rate", ".3f"), ("vs smallest", "vs", ".2f"), ("peak MiB", "peak", ".0f"),
    ("+MiB", "extra", ".0f"), ("max RSS", "maxrss", ".0f"),
]


# ----------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts-grid", default="32,64,128,256", help="prompts per batch (empty: skip the axis)")
    parser.add_argument("--models-grid", default="3M,20M,80M", help=f"of {sorted(MODEL_SHAPES)} (empty: skip)")
    parser.add_argument("--model-prompts", type=int, default=32, help="prompts per batch on the model axis")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per point")
    parser.add_argument("--dry-run", action="store_true", help="build the models, print the points, measure nothing")
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point (JSON overrides)
    parser.add_argument("--point-dir", help=argparse.SUPPRESS)  # internal: where that point's run goes
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every point")
    args = parser.parse_args()
    setup_process(args.threads)
    if args.point:
        print(json.dumps(measure_point(json.loads(args.point), Path(args.point_dir))))
        return
    unknown = [s for s in parse_grid(args.models_grid) if s not in MODEL_SHAPES]
    if unknown:
        parser.error(f"unknown model sizes {unknown}; choose from {sorted(MODEL_SHAPES)} (or add to MODEL_SHAPES)")

    base = resolve_model_path(load_config(None, args.overrides))  # builds the embedded base if missing
    with tempfile.TemporaryDirectory(prefix="aepo-scaling-models-") as tmp:
        models = {size: build_random_policy(size, base, Path(tmp)) for size in parse_grid(args.models_grid)}
        for size, folder in models.items():
            print(f"model {size}: {count_parameters(folder):,} parameters, random init ({folder.name})")
        points = grid_points(args, models)
        if args.dry_run:
            for p in points:
                print(f"{p['axis']:>7} {p['value']:>5}: {' '.join(p['overrides'])}")
            return
        results = []
        for p in points:
            results.append(run_point(p, args))
            r = results[-1]
            print(f"{p['axis']} {p['value']}: " + (r["error"][:300] if "error" in r else
                  f"{r['seconds']['total']:.2f}s, {r['generated_tokens']} tokens"), flush=True)

    add_rates(results)
    print(f"\nAEPO, one measured iteration per point (iteration 1 after a warm-up), max new tokens "
          f"{args.max_new_tokens}, model axis at {args.model_prompts} prompts, overrides {args.overrides or 'none'}, "
          f"torch threads {args.threads or 'default'}")
    print_table(COLUMNS, [table_row(r) for r in results])
    for r in results:
        if "error" in r:
            print(f"{r['axis']} {r['value']} failed: {r['error'][:500]}")
    method = next((r["memory_iteration_1"]["method"] for r in results if "error" not in r), None)
    if method:
        print(f"memory: {method}")
    write_json(args.out, {"args": vars(args), "model_shapes": MODEL_SHAPES, "memory_method": method,
                          "points": results})


if __name__ == "__main__":
    main()
