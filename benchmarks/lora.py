"""LoRA vs full fine-tuning on the embedded default: trainable parameters, optimiser state, update time.

One real AEPO iteration's inputs are made first (prepare, rollout and reward stages of a throwaway
run of the embedded default, in a temporary folder); then both variants perform the update step on
them, alternating, each repeat on a fresh copy of the base policy and a fresh AdamW (made outside
the timed region), after one warm-up each:

    full   every weight trains (model.lora.enabled false, the default)
    lora   peft adapters on the frozen base (model.lora: rank, alpha, targets from the config)

Columns: trainable parameters; optimiser-state bytes (AdamW's moments in memory, after the step) and
the size of the `optimizer.pt` the update stage writes; median (min, max) seconds of `update_step`;
median seconds of what the stage then writes (full: policy/ + optimizer.pt; lora: adapter/ +
optimizer.pt + merging and writing policy/); ratios lora / full.

    python benchmarks/lora.py [--prompts 32] [--n 8] [--repeats 5] [--threads N] [overrides ...]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import iteration0_batches  # benchmarks/common.py (the script's folder is on sys.path)

from aepo_core.core.update import autocast_dtype, make_optimizer, update_step
from aepo_core.io.lora import merge_into_base, save_adapter, trainable_lora
from aepo_core.io.models import write_policy

VARIANTS = ("full", "lora")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimiser's per-parameter state tensors (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))


def saved_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Size of `optimizer.pt` as the update stage writes it (torch.save of the state dict)."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/lora.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.lora.rank=16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cfg, pristine, tokenizer, policy_batch, reg_batch, decision = iteration0_batches(
            args.prompts, args.n, Path(tmp), args.overrides)
    amp = autocast_dtype(torch.device("cpu"), cfg.trainer.dtype)
    print(f"batch: {len(policy_batch)} policy rows ({int(policy_batch.response_mask.sum())} response tokens), "
          f"{len(reg_batch) if reg_batch is not None else 0} regulariser rows; "
          f"{sum(p.numel() for p in pristine.parameters()):,} parameters; LoRA rank {cfg.model.lora.rank}, "
          f"alpha {cfg.model.lora.alpha}, {len(cfg.model.lora.target_modules)} target modules; "
          f"autocast {amp}; {torch.get_num_threads()} threads")

    def run_variant(name: str, folder: Path) -> dict[str, float]:
        policy = copy.deepcopy(pristine)
        if name == "lora":
            policy = trainable_lora(policy, cfg.model.lora, None, seed=0)
        policy.train()
        optimizer = make_optimizer(policy, cfg.trainer)
        t0 = time.perf_counter()
        update_step(policy, optimizer, policy_batch, reg_batch, cfg.algorithm, cfg.trainer, decision,
                    group_size=args.n)
        step = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        if name == "lora":
            save_adapter(policy, folder / "adapter")
            policy = merge_into_base(policy)
        write_policy(policy, tokenizer, folder / "policy")
        save = time.perf_counter() - t0
        trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        return {"step_s": step, "save_s": save, "trainable": trainable,
                "state_bytes": state_bytes(optimizer), "optimizer_pt_bytes": saved_bytes(optimizer)}

    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # repeat 0: warm-up, not kept
            for v in VARIANTS:
                folder = Path(tmp) / f"{v}-{repeat}"
                folder.mkdir()
                out = run_variant(v, folder)
                if repeat:
                    results[v].append(out)

    rows = {}
    for v in VARIANTS:
        steps = [r["step_s"] for r in results[v]]
        rows[v] = {
            "trainable_parameters": int(results[v][0]["trainable"]),
            "optimizer_state_bytes": int(results[v][0]["state_bytes"]),
            "optimizer_pt_bytes": int(results[v][0]["optimizer_pt_bytes"]),
            "step_median_s": statistics.median(steps), "step_min_s": min(steps), "step_max_s": max(steps),
            "save_median_s": statistics.median(r["save_s"] for r in results[v]),
        }
    ratio = {k: rows["lora"][k] / rows["full"][k] for k in rows["full"] if k.endswith(("parameters", "bytes", "median_s"))}
    print(f"{'':6s} {'trainable':>10s} {'opt state B':>12s} {'optimizer.pt B':>15s} "
          f"{'step s (min-max)':>22s} {'save s':>7s}")
    for v in VARIANTS:
        r = rows[v]
        print(f"{v:6s} {r['trainable_parameters']:10,d} {r['optimizer_state_bytes']:12,d} {r['optimizer_pt_bytes']:15,d} "
              f"{r['step_median_s']:8.3f} ({r['step_min_s']:.3f}-{r['step_max_s']:.3f}) {r['save_median_s']:7.3f}")
    print(f"{'ratio':6s} {ratio['trainable_parameters']:10.4f} {ratio['optimizer_state_bytes']:12.4f} "
          f"{ratio['optimizer_pt_bytes']:15.4f} {ratio['step_median_s']:8.3f}{'':15s} {ratio['save_median_s']:7.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"prompts": args.prompts, "n": args.n, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "overrides": args.overrides, "autocast": str(amp)}
    out.write_text(json.dumps({"config": meta, "rows": rows, "ratio_lora_to_full": ratio}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
