"""GPU check: train a few AEPO iterations of a locally built ~100M-parameter Qwen2 policy with the HF
engine and report rollout tokens/s, update tokens/s and peak GPU memory.

    bash scripts/gpu_check.sh                 # on a CUDA machine
    python scripts/gpu_check.py --device cpu --hidden 128 --layers 2 --iterations 2   # smoke test

The policy is built from the embedded task's tokenizer with random weights (nothing is downloaded),
so its rewards are near zero: this measures the machinery's speed and memory, not learning.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu for a smoke test")

    import random

    from aepo_core.io.models import save_policy
    from aepo_core.task.base_policy import BaseRecipe, build_model
    from aepo_core.task.synthetic import generate_problems, worked_trace
    from aepo_core.task.tokenizer import build_tokenizer
    from flows.train import train

    rng = random.Random(0)
    problems = generate_problems(2000, 0, 3, 5, 9, "gpu")
    tokenizer = build_tokenizer([worked_trace(p.terms, rng) for p in problems] + [p.prompt for p in problems])
    recipe = BaseRecipe(hidden_size=args.hidden, num_layers=args.layers, num_heads=max(1, args.hidden // 64),
                        num_kv_heads=max(1, args.hidden // 128), intermediate_size=args.hidden * 8 // 3)
    model = build_model(recipe, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    work = Path(tempfile.mkdtemp(prefix="aepo-gpu-check-"))
    save_policy(model, tokenizer, work / "policy")
    del model
    dtype = "bfloat16" if args.device == "cuda" else "auto"
    result = train(
        run_dir=str(work / "run"),
        iterations=args.iterations,
        overrides=[
            f"model.path={work / 'policy'}", f"run.runs_root={work}", f"trainer.device={args.device}",
            f"trainer.dtype={dtype}", "trainer.gradient_checkpointing=true", "trainer.lr=1e-5",
            f"rollout.prompts_per_batch={args.prompts}", f"rollout.n={args.n}",
            f"rollout.max_new_tokens={args.max_new_tokens}", "evaluation.num_prompts=32", "evaluation.n=2",
        ],
    )
    run = Path(result["run_dir"])
    rows = []
    for i in range(args.iterations):
        ro = json.loads((run / f"iter_{i:04d}/rollout/_SUCCESS.json").read_text())["metrics"]
        up = json.loads((run / f"iter_{i:04d}/update/_SUCCESS.json").read_text())["metrics"]
        rows.append({
            "iteration": i,
            "rollout_tokens_per_s": ro["tokens_per_s"],
            "update_tokens_per_s": up.get("batch/response_tokens", 0) / up["step_seconds"],
            "update_seconds": up["step_seconds"],
        })
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    print(f"policy: {params / 1e6:.1f} M parameters, device {args.device}, {args.prompts} prompts x {args.n}, "
          f"<= {args.max_new_tokens} tokens")
    print(f"{'iter':>4} {'rollout tok/s':>14} {'update tok/s':>13} {'update s':>9}")
    for r in rows:
        print(f"{r['iteration']:>4} {r['rollout_tokens_per_s']:>14.0f} {r['update_tokens_per_s']:>13.0f} {r['update_seconds']:>9.2f}")
    print(f"peak GPU memory allocated: {peak:.2f} GiB" if args.device == "cuda" else "peak GPU memory: n/a on cpu")
    if args.out:
        Path(args.out).write_text(json.dumps({"params": params, "device": args.device, "rows": rows, "peak_gib": peak}, indent=2))


if __name__ == "__main__":
    main()
