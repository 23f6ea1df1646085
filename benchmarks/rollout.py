"""Rollout throughput: the HF engine (per-row temperature, KV-cached loop) vs plain `model.generate`.

Same model, same prompts, same n and token budget, sampled at T=1; the two sides alternate within one
process and the table reports the median, min and max tokens/s over the repeats and the ratio of
medians. Generated tokens are counted up to and including EOS on both sides.

    python benchmarks/rollout.py [--prompts 64] [--n 8] [--max-new-tokens 48] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from aepo_core.config import load_config
from aepo_core.datasets import load_prompt_table
from aepo_core.engines.base import SamplingRequest
from aepo_core.engines.hf import HFRolloutEngine
from aepo_core.models import load_policy, load_tokenizer, resolve_model_path
from aepo_core.prompts import encode_prompts


def generated_tokens(sequences: torch.Tensor, eos_id: int, pad_id: int) -> int:
    """Tokens generated per row up to and including the first EOS (or all, if none)."""
    total = 0
    for row in sequences.tolist():
        stop = next((i + 1 for i, t in enumerate(row) if t == eos_id), None)
        total += stop if stop is not None else sum(t != pad_id for t in row)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: the embedded base policy)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/rollout.json")
    args = parser.parse_args()

    cfg = load_config(None, [f"model.path={args.model}"] if args.model else [])
    path = resolve_model_path(cfg)
    model, tok = load_policy(path).eval(), load_tokenizer(path)
    table = load_prompt_table(cfg.data, "eval").slice(0, args.prompts)
    prompt_ids = encode_prompts(tok, table.column("prompt").to_pylist())
    engine = HFRolloutEngine(model, tok)
    requests = [SamplingRequest(p, n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens) for p in prompt_ids]
    padded = tok.pad({"input_ids": prompt_ids}, return_tensors="pt", padding=True)  # left padding

    def run_engine(seed: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        out = engine.generate(requests, seed=seed)
        return sum(len(c.token_ids) for c in out), time.perf_counter() - t0

    @torch.inference_mode()
    def run_generate(seed: int) -> tuple[int, float]:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        seqs = model.generate(
            **padded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.n, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        seconds = time.perf_counter() - t0
        return generated_tokens(seqs[:, padded["input_ids"].shape[1]:], tok.eos_token_id, tok.pad_token_id), seconds

    sides = {"hf_engine": run_engine, "model.generate": run_generate}
    for fn in sides.values():  # warm-up: the first full-size call is slower
        fn(0)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.repeats):
        for name, fn in (sides.items() if r % 2 == 0 else reversed(sides.items())):
            tokens, seconds = fn(r + 1)
            rates[name].append(tokens / seconds)
    rows = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for name, v in rates.items()
    }
    ratio = rows["hf_engine"]["median"] / rows["model.generate"]["median"]
    print(f"workload: {args.prompts} prompts x {args.n} samples x <= {args.max_new_tokens} tokens, T=1, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, torch threads {torch.get_num_threads()}")
    print(f"{'side':<16}{'median tok/s':>14}{'min':>10}{'max':>10}")
    for name, row in rows.items():
        print(f"{name:<16}{row['median']:>14.0f}{row['min']:>10.0f}{row['max']:>10.0f}")
    print(f"ratio hf_engine / model.generate (medians): {ratio:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
