"""Update-step speed: our GRPO `update_step` vs TRL's `GRPOTrainer` performing the same step.

    python benchmarks/update_vs_trl.py [--prompts 32] [--n 8] [--max-new-tokens 48] [--repeats 5]
                                       [--threads N] [--out benchmarks/results/update_vs_trl.json]

Needs the `bench` extra (`pip install -e '.[bench]'`: TRL and accelerate). Runs on the CPU, float32.

The batch. One real rollout of the embedded default: the first --prompts prompts of the train split,
--n responses each sampled at T = 1 by the HF engine (seed 0), judged by the configured verifier. Both
sides train on exactly these rows (groups of n consecutive responses of one prompt), so they see the
same response tokens; tokens/s is response tokens in the batch / seconds of one update.

The step. One optimiser step over the whole batch, from the pristine base policy each repeat (the copy
and the optimiser are made outside the timed region; generation and scoring are never timed):
  - ours: `aepo_core.core.update.update_step` with algorithm "grpo" and the config defaults
    (trainer.dtype=float32, one mini-batch, one micro-batch, AdamW from `make_optimizer`). Its timed
    region includes what update_step does: the advantages, the training forward/backward (one
    on-policy mini-batch: pi_old's log-probs are the training pass's own, no extra forward), grad-norm
    clipping, the AdamW step and its metrics (entropies, clip fractions).
  - TRL: a `GRPOTrainer` (use_vllm=False, beta=0 so no reference model, num_generations=n,
    per_device_train_batch_size = the whole batch, gradient_accumulation_steps=1, num_iterations=1,
    same lr / weight decay / betas / max_grad_norm, epsilon = clip_low, epsilon_high = clip_high,
    optim="adamw_torch"). Its timed region is what Trainer's inner loop does with one generated batch:
    `compute_loss` -> `accelerator.backward` -> `accelerator.clip_grad_norm_` -> `optimizer.step()` ->
    `model.zero_grad()`. The input is the dict `_generate_and_score_completions` returns (prompt ids and
    mask left-padded, completion ids and mask right-padded, with TRL's own `pad`, `num_items_in_batch`).
    With num_iterations=1 and steps_per_generation == gradient_accumulation_steps TRL computes no
    `old_per_token_logps` (it uses `per_token_logps.detach()`, ratio 1), so the dict has none: both
    sides run one forward and one backward.

Loss type: our `algorithm.loss_agg` default is token_mean, the sum of the per-token losses over every
response token of the batch divided by their number. TRL's "dapo" (its default) divides by
`num_items_in_batch`, the active tokens of the whole generation batch: the same normaliser here (one
process, no accumulation). "bnpo" (the local batch's tokens) would also be identical with one
micro-batch; "dapo" is chosen because it is TRL's default and is defined as the global token mean,
which is what token_mean means. "grpo" (per-sequence mean, then mean over sequences) would differ.

Advantages: both sides use ours, `group_advantages(rewards, n, "group")` = (r - mean_g) / (std_g + 1e-6)
with the unbiased group std. TRL's own scoring computes the same with eps 1e-4; passing ours keeps the
two losses comparable to float precision (scoring is not timed either way).

Sanity check: on the first timed repeat the two losses and pre-clip gradient norms are printed. Both
steps are on-policy (ratio exactly 1), so each loss is -sum(A * mask) / sum(mask) and must agree to float
precision; the gradient norm checks the log-probs and the backward: it agrees to float rounding only
(TRL left-pads prompts and lets positions start at 0 at the padding, we right-pad; RoPE is relative,
so only rounding changes; TRL's fused LM head computes log-probs in its own chunks).

Known differences that remain (they do not change the work done):
  - HF Trainer's optimizer excludes biases and norm weights from weight decay; `make_optimizer` decays
    every parameter. Same AdamW class (torch.optim.AdamW), lr, betas, eps 1e-8, weight decay value.
  - Our dual clip (algorithm.dual_clip) has no TRL counterpart; at ratio 1 it is inactive.
  - TRL also computes the per-token entropy in its fused head (for its metrics); we compute the
    full-vocabulary entropy too (for ours).

Memory: each side's "peak extra RSS" is measured in a fresh subprocess that loads the policy, builds the
side (policy copy, optimiser, trainer) and the batch, resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs), runs ONE update and reads VmHWM: peak resident memory during the update minus
the resident memory just before it, in MiB. It counts everything the update touched for the first time:
activations, gradients, the AdamW moments (created at the first step), allocator overhead. Memory
that the allocator kept from setup and reused is not counted. Where clear_refs is unavailable it falls
back to ru_maxrss after minus before, which is 0 if setup peaked higher (the output names the method).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import peak_rss  # benchmarks/common.py (the script's folder is on sys.path)

from aepo_core.config import Config, load_config
from aepo_core.core.advantages import group_advantages
from aepo_core.core.aepo import ControllerState
from aepo_core.core.batch import SequenceBatch
from aepo_core.core.update import make_optimizer, update_step
from aepo_core.io.engines.base import SamplingRequest
from aepo_core.io.engines.hf import HFRolloutEngine
from aepo_core.io.models import load_policy, load_tokenizer
from aepo_core.io.prompts import encode_prompts
from aepo_core.io.verifiers import make_verifier
from aepo_core.pipeline.sources import load_prompt_table, resolve_model_path

# the project's config for this comparison: plain GRPO, float32 on the CPU (TRL runs with use_cpu, bf16=False)
OVERRIDES = ["algorithm.name=grpo", "trainer.dtype=float32", "trainer.device=cpu"]
TRL_LOSS_TYPE = {"token_mean": "dapo"}  # see the module docstring; other loss_agg values have no exact twin
# GRPOConfig's own defaults trip this transformers 5 deprecation notice; it says nothing about the benchmark
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)


# ---------------------------------------------------------------------------------------- the batch
@dataclass
class Rollout:
    """The sampled batch as plain lists, one entry per row; rows i*n .. i*n+n-1 answer prompt i."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: list[float]
    n: int
    pad_id: int

    @property
    def response_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    def mixed_groups(self) -> float:
        """Fraction of prompts whose responses got different rewards (the others have advantage 0)."""
        groups = [self.rewards[i : i + self.n] for i in range(0, len(self.rewards), self.n)]
        return sum(min(g) != max(g) for g in groups) / max(1, len(groups))


def sample_rollout(cfg: Config, model, tokenizer, prompts: int, n: int, max_new_tokens: int) -> Rollout:
    table = load_prompt_table(cfg.data, "train").slice(0, prompts)
    prompt_ids = encode_prompts(tokenizer, table.column("prompt").to_pylist(), cfg.data.prompt_suffix)
    answers = table.column("answer").to_pylist()
    engine = HFRolloutEngine(model, tokenizer)
    requests = [SamplingRequest(ids, n, 1.0, 1.0, max_new_tokens) for ids in prompt_ids]
    # the engine returns rows ordered by request then sample; sort anyway, as the update stage does,
    # because group advantages assume groups of n consecutive rows
    completions = sorted(engine.generate(requests, seed=0), key=lambda c: (c.request_index, c.sample_index))
    verifier = make_verifier(cfg.data.verifier)
    try:
        judged = verifier.judge_batch([c.text for c in completions], [answers[c.request_index] for c in completions])
    finally:
        verifier.close()
    return Rollout(
        prompt_ids=[prompt_ids[c.request_index] for c in completions],
        response_ids=[c.token_ids for c in completions],
        rewards=[j.reward for j in judged],
        n=n,
        pad_id=tokenizer.pad_token_id,
    )


def our_batch(rollout: Rollout) -> SequenceBatch:
    """Right-padded prompt + response rows, built as the update stage's `_batch_of` builds them."""
    return SequenceBatch.from_token_lists(
        rollout.prompt_ids,
        rollout.response_ids,
        rollout.pad_id,
        rewards=torch.tensor(rollout.rewards, dtype=torch.float32),
        temperatures=torch.ones(len(rollout.rewards)),  # every row was sampled at T = 1
    )


def trl_inputs(rollout: Rollout, cfg: Config) -> dict[str, torch.Tensor]:
    """The dict TRL's `_generate_and_score_completions` returns for these rows (num_iterations=1, no vLLM,
    beta=0: no old_per_token_logps, no ref_per_token_logps), with our group advantages."""
    from trl.trainer.utils import pad

    def padded(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
        return pad([torch.tensor(r, dtype=torch.long) for r in rows], padding_value=value, padding_side=side)

    def ones(rows: list[list[int]]) -> list[list[int]]:
        return [[1] * len(r) for r in rows]

    completion_mask = padded(ones(rollout.response_ids), 0, "right")
    rewards = torch.tensor(rollout.rewards, dtype=torch.float32)
    return {
        "prompt_ids": padded(rollout.prompt_ids, rollout.pad_id, "left"),
        "prompt_mask": padded(ones(rollout.prompt_ids), 0, "left"),
        "completion_ids": padded(rollout.response_ids, rollout.pad_id, "right"),
        "completion_mask": completion_mask,
        "advantages": group_advantages(rewards, rollout.n, cfg.algorithm.advantage_scaling),
        "num_items_in_batch": completion_mask.sum(),
    }


# ---------------------------------------------------------------------------------------- the sides
class OursSide:
    """`update_step` on a fresh copy of the base policy with a fresh AdamW."""

    def __init__(self, pristine, rollout: Rollout, cfg: Config) -> None:
        self.pristine, self.cfg, self.n = pristine, cfg, rollout.n
        self.batch = our_batch(rollout)
        self.policy = self.optimizer = None

    def prepare(self) -> None:
        self.policy = copy.deepcopy(self.pristine).train()
        self.optimizer = make_optimizer(self.policy, self.cfg.trainer)

    def step(self) -> dict[str, float]:
        result = update_step(
            self.policy, self.optimizer, self.batch, None, self.cfg.algorithm, self.cfg.trainer,
            ControllerState.initial(self.cfg.algorithm), group_size=self.n,
        )
        return {"loss": result.metrics["loss/total"], "grad_norm": result.metrics["actor/grad_norm"]}


class TrlSide:
    """`GRPOTrainer.compute_loss` + backward + clip + AdamW step on the same rows.

    The trainer is built once (it patches the model's forward with its fused LM head); each repeat
    restores the pristine weights in place and creates a fresh optimizer, outside the timed region.
    """

    def __init__(self, pristine, tokenizer, rollout: Rollout, cfg: Config, max_new_tokens: int, workdir: str) -> None:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        algo, trainer_cfg = cfg.algorithm, cfg.trainer
        if algo.loss_agg not in TRL_LOSS_TYPE:
            raise SystemExit(f"algorithm.loss_agg={algo.loss_agg!r} has no TRL loss type that matches exactly")
        self.pristine = pristine
        self.inputs = trl_inputs(rollout, cfg)
        args = GRPOConfig(
            output_dir=workdir,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            use_vllm=False,
            beta=0.0,
            num_generations=rollout.n,
            num_iterations=1,
            per_device_train_batch_size=len(rollout.rewards),  # the whole batch: one optimizer step
            gradient_accumulation_steps=1,
            max_completion_length=max_new_tokens,
            temperature=1.0,
            loss_type=TRL_LOSS_TYPE[algo.loss_agg],
            scale_rewards=algo.advantage_scaling,
            epsilon=algo.clip_low,
            epsilon_high=algo.clip_high,
            learning_rate=trainer_cfg.lr,
            weight_decay=trainer_cfg.weight_decay,
            adam_beta1=trainer_cfg.betas[0],
            adam_beta2=trainer_cfg.betas[1],
            max_grad_norm=trainer_cfg.grad_clip,
            optim="adamw_torch",  # torch.optim.AdamW, the class make_optimizer uses
            disable_dropout=True,  # update_step trains without dropout too
            seed=trainer_cfg.seed,
        )
        self.trainer = GRPOTrainer(
            model=copy.deepcopy(pristine),
            reward_funcs=_dummy_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["unused: the batch is given, not generated"]}),
            processing_class=tokenizer,
        )
        # Trainer's training loop sets this per optimizer step; compute_loss reads it
        self.trainer.current_gradient_accumulation_steps = 1

    def prepare(self) -> None:
        model = self.trainer.model
        model.load_state_dict(self.pristine.state_dict())
        model.zero_grad(set_to_none=True)
        model.train()
        self.trainer.optimizer = None
        self.trainer.create_optimizer()

    def step(self) -> dict[str, float]:
        trainer, model = self.trainer, self.trainer.model
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, self.inputs, num_items_in_batch=self.inputs["num_items_in_batch"])
        trainer.accelerator.backward(loss)
        grad_norm = trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        model.zero_grad()
        return {"loss": loss.item(), "grad_norm": float(grad_norm)}


def _dummy_reward(completions, **kwargs) -> list[float]:
    """Required by GRPOTrainer; never called (nothing is generated or scored)."""
    return [0.0] * len(completions)


# ---------------------------------------------------------------------------------------- measuring
def timed(side) -> tuple[float, dict[str, float]]:
    side.prepare()
    gc.collect()  # no collection of the previous repeat's garbage inside the timed region
    started = time.perf_counter()
    out = side.step()
    return time.perf_counter() - started, out


def memory_in_subprocess(side: str, rollout_file: Path, args: argparse.Namespace) -> dict:
    """Run this script in `--memory-side` mode: a fresh process, so one side's allocations cannot hide
    or inflate the other's."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-side", side, "--rollout-file", str(rollout_file),
           "--max-new-tokens", str(args.max_new_tokens)]
    env = dict(os.environ)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {side} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def setup(threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(None, OVERRIDES)
    path = resolve_model_path(cfg)
    return cfg, load_policy(path, dtype="float32").eval(), load_tokenizer(path)


def make_side(name: str, pristine, tokenizer, rollout: Rollout, cfg: Config, max_new_tokens: int, workdir: str):
    if name == "ours":
        return OursSide(pristine, rollout, cfg)
    if name == "trl":
        return TrlSide(pristine, tokenizer, rollout, cfg, max_new_tokens, workdir)
    raise ValueError(name)


def memory_main(args: argparse.Namespace) -> None:
    cfg, pristine, tokenizer = setup(args.threads)
    rollout = Rollout(**json.loads(Path(args.rollout_file).read_text()))
    with tempfile.TemporaryDirectory() as workdir:
        side = make_side(args.memory_side, pristine, tokenizer, rollout, cfg, args.max_new_tokens, workdir)
        side.prepare()
        _, memory = peak_rss(side.step)
    print(json.dumps({"peak_extra_mib": memory["extra_mib"], "method": memory["method"]}))


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8, help="responses per prompt (TRL num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/update_vs_trl.json")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-side", help=argparse.SUPPRESS)  # internal: one memory measurement
    parser.add_argument("--rollout-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_side:
        memory_main(args)
        return

    import trl

    cfg, pristine, tokenizer = setup(args.threads)
    rollout = sample_rollout(cfg, pristine, tokenizer, args.prompts, args.n, args.max_new_tokens)
    tokens = rollout.response_tokens
    names = ["ours", "trl"]
    with tempfile.TemporaryDirectory() as workdir:
        sides = {name: make_side(name, pristine, tokenizer, rollout, cfg, args.max_new_tokens, workdir) for name in names}
        for side in sides.values():  # warm-up: the first call of each side allocates and initialises more
            timed(side)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        first: dict[str, dict[str, float]] = {}
        for r in range(args.repeats):
            # alternate the order so neither side always runs right after the other
            for name in names if r % 2 == 0 else names[::-1]:
                dt, out = timed(sides[name])
                seconds[name].append(dt)
                first.setdefault(name, out)
        shapes = {
            "ours": list(sides["ours"].batch.input_ids.shape),
            "trl": [len(rollout.rewards),
                    sides["trl"].inputs["prompt_ids"].shape[1] + sides["trl"].inputs["completion_ids"].shape[1]],
        }

        memory = {}
        if not args.no_memory:
            rollout_file = Path(workdir) / "rollout.json"
            rollout_file.write_text(json.dumps(asdict(rollout)))
            memory = {name: memory_in_subprocess(name, rollout_file, args) for name in ("ours", "trl")}

    rows = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        rows[name] = {
            "median_s": median, "min_s": min(values), "max_s": max(values),
            "tokens_per_s": tokens / median, "runs_s": values,
            "peak_extra_mib": memory.get(name, {}).get("peak_extra_mib"),
        }
    ratio = rows["trl"]["median_s"] / rows["ours"]["median_s"]
    check = sanity_check(first["ours"], first["trl"])

    print(f"workload: {args.prompts} prompts x {args.n} responses (<= {args.max_new_tokens} tokens, T=1), "
          f"{len(rollout.rewards)} rows, {tokens} response tokens, {rollout.mixed_groups():.0%} mixed-reward groups; "
          f"{sum(p.numel() for p in pristine.parameters()) / 1e6:.1f} M params, float32 CPU, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, trl {trl.__version__}")
    print(f"padded [rows, positions] per forward: ours {shapes['ours']} "
          f"TRL {shapes['trl']}")
    print(f"{'side':<20}{'median s':>10}{'min s':>9}{'max s':>9}{'resp tok/s':>12}{'peak extra MiB':>16}")
    for name, row in rows.items():
        mem = f"{row['peak_extra_mib']:.1f}" if row["peak_extra_mib"] is not None else "-"
        print(f"{name:<20}{row['median_s']:>10.3f}{row['min_s']:>9.3f}{row['max_s']:>9.3f}"
              f"{row['tokens_per_s']:>12.0f}{mem:>16}")
    print(f"ratio TRL / ours (median seconds): {ratio:.2f}  (> 1: TRL's step is slower)")
    if memory:
        print(f"peak extra memory: {memory['ours']['method']}, one update in a fresh process")
    print(f"sanity (first repeat): loss ours {check['loss_ours']:.7f} TRL {check['loss_trl']:.7f} "
          f"(|diff| {check['loss_abs_diff']:.1e}); pre-clip grad norm ours {check['grad_norm_ours']:.6f} "
          f"TRL {check['grad_norm_trl']:.6f} (rel diff {check['grad_norm_rel_diff']:.1e}) -> "
          f"{'same step' if check['agree'] else 'MISMATCH'}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items() if k not in ("memory_side", "rollout_file")},
        "workload": {"rows": len(rollout.rewards), "response_tokens": tokens, "mixed_groups": rollout.mixed_groups(),
                     "padded_shapes": shapes, "torch_threads": torch.get_num_threads(),
                     "torch": torch.__version__, "trl": trl.__version__,
                     "trl_loss_type": TRL_LOSS_TYPE[cfg.algorithm.loss_agg]},
        "results": rows,
        "ratio_trl_over_ours_median_s": ratio,
        "memory_method": memory.get("ours", {}).get("method"),
        "sanity": check,
    }, indent=2))
    print(f"wrote {out}")


def sanity_check(ours: dict[str, float], trl_out: dict[str, float]) -> dict:
    loss_diff = abs(ours["loss"] - trl_out["loss"])
    norm_diff = abs(ours["grad_norm"] - trl_out["grad_norm"]) / max(abs(ours["grad_norm"]), 1e-12)
    return {
        "loss_ours": ours["loss"], "loss_trl": trl_out["loss"], "loss_abs_diff": loss_diff,
        "grad_norm_ours": ours["grad_norm"], "grad_norm_trl": trl_out["grad_norm"], "grad_norm_rel_diff": norm_diff,
        # the losses are the same formula at ratio 1 (float32 sums); the norms differ by rounding only
        "agree": loss_diff <= 1e-6 + 1e-5 * abs(ours["loss"]) and (norm_diff <= 1e-3 or ours["grad_norm"] < 1e-9),
    }


if __name__ == "__main__":
    main()
