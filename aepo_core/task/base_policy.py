"""The embedded base policy: tokenizer + tiny Qwen2 LM, taught the synthetic task by a short warm-up.

`ensure_base_policy(cfg)` returns the folder of a standard HF checkpoint (config.json,
model.safetensors, generation_config.json, tokenizer files) that transformers and vLLM both load.
It is built once per recipe (seed, sizes, task) and cached; `aepo build-base` builds it explicitly.
The warm-up stops at a fixed number of steps, so the base policy is only partly trained: it answers
some prompts and has real entropy, the starting point RL needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from aepo_core.atomic import atomic_dir
from aepo_core.config import SyntheticTaskConfig
from aepo_core.core.update import autocast_dtype
from aepo_core.io.models import write_policy
from aepo_core.io.prompts import chat_prompt_ids
from aepo_core.task import synthetic
from aepo_core.task.tokenizer import IM_END, build_tokenizer


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the base policy; its digest names the cache folder."""

    seed: int = 0
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    vocab_size: int = 400
    warmup_steps: int = 600
    batch_size: int = 64
    lr: float = 7e-4
    # bf16 autocast where the hardware has bf16 arithmetic (a GPU; a CPU with AVX512-BF16 or AMX,
    # ~1.8x faster there); elsewhere float32, since emulated bf16 is ~25x slower than it (an AVX2-only EPYC:
    # 38 warm-up steps in 22 minutes). Part of the recipe; aepo_base.json records what a build used.
    bf16_autocast: bool = True
    # warm-up traces take the first term left in prompt order with this probability at each step,
    # else a uniformly random one: the base policy prefers one order without being sure of it, so its
    # entropy among valid answers sits below the uniform ceiling with room both ways
    order_bias: float = 0.75
    task: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)

    def digest(self) -> str:
        blob = json.dumps(asdict(self) | {"task": self.task.model_dump()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    return Path(os.environ.get("AEPO_CACHE", Path.home() / ".cache" / "aepo"))


def _demo_corpus(problems: list[synthetic.Problem], rng: random.Random, order_bias: float) -> list[str]:
    return [synthetic.worked_trace(p.terms, rng, order_bias) for p in problems]


def build_model(recipe: BaseRecipe, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    return Qwen2ForCausalLM(config)


def _sft_batch(
    tokenizer: PreTrainedTokenizerFast, prompts: list[list[int]], responses: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [prompt + response]; labels are -100 outside the response."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(r)
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def warmup_autocast(recipe: BaseRecipe, device: torch.device) -> torch.dtype | None:
    """The warm-up's autocast dtype: bfloat16 if the recipe asks for it and ``device`` computes in
    bf16 natively (trainer.dtype "auto"'s rule, :func:`aepo_core.core.update.autocast_dtype`), else
    None (float32)."""
    return autocast_dtype(device, "auto") if recipe.bf16_autocast else None


def warm_up(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[synthetic.Problem],
    recipe: BaseRecipe,
    log=print,
) -> list[float]:
    """Supervised warm-up on worked traces in prompt-biased random order; returns the loss per step."""
    rng = random.Random(recipe.seed)
    device = next(model.parameters()).device  # where the model is (the build uses the CPU)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    prompt_ids = {p.id: chat_prompt_ids(tokenizer, p.prompt) for p in problems}
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, recipe.warmup_steps // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, recipe.warmup_steps - warm)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    dtype = warmup_autocast(recipe, device)
    model.train()
    losses = []
    for step in range(recipe.warmup_steps):
        batch = rng.sample(problems, recipe.batch_size)
        responses = [tokenizer.encode(synthetic.worked_trace(p.terms, rng, recipe.order_bias)) + [eos] for p in batch]
        ids, mask, labels = (t.to(device) for t in _sft_batch(tokenizer, [prompt_ids[p.id] for p in batch], responses))
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == recipe.warmup_steps - 1):
            log(f"warm-up step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    return losses


def build_base_policy(recipe: BaseRecipe, folder: Path, log=print) -> dict:
    """Build tokenizer + model, warm it up, save an HF folder at `folder` atomically. Returns build info."""
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    t = recipe.task
    train, _ = synthetic.make_splits(t.seed, t.n_train, t.n_eval, t.min_terms, t.max_terms, t.max_value)
    rng = random.Random(recipe.seed)
    corpus = _demo_corpus(train[:5000], rng, recipe.order_bias) + [p.prompt for p in train[:5000]]
    tokenizer = build_tokenizer(corpus, vocab_size=recipe.vocab_size)
    model = build_model(recipe, tokenizer)
    losses = warm_up(model, tokenizer, train, recipe, log=log)
    model.generation_config = GenerationConfig(
        eos_token_id=model.config.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0
    )
    info = {
        "recipe": asdict(recipe) | {"task": recipe.task.model_dump()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-20:]) / min(20, len(losses)),
        "build_seconds": round(time.perf_counter() - started, 1),
        # what the warm-up computed in on this machine (the recipe's bf16_autocast is a request)
        "warmup_autocast": str(warmup_autocast(recipe, next(model.parameters()).device) or "float32"),
    }
    with atomic_dir(folder) as tmp:
        write_policy(model, tokenizer, tmp)
        # what the base policy does on held-out prompts (accuracy, entropy, valid choices): the
        # starting point a user's entropy targets are chosen against; ~10 s
        info["profile"] = profile_policy(tmp, recipe.task, num_prompts=128, n=8, seed=recipe.seed)
        (tmp / "aepo_base.json").write_text(json.dumps(info, indent=2))
    if log:
        pr = info["profile"]
        log(f"base policy: held-out avg@8 {pr['accuracy']:.3f}, entropy {pr['entropy_nll']:.3f} nats/token "
            f"(a uniformly random valid answer: {pr['uniform_valid_entropy']:.3f}), probability on valid "
            f"choices {pr['choice/valid_prob']:.3f}, entropy among them {pr['choice/valid_entropy']:.3f} nats; "
            f"built in {info['build_seconds']:.0f} s (warm-up in {info['warmup_autocast']})")
    return info


def recipe_for(task: SyntheticTaskConfig) -> BaseRecipe:
    return BaseRecipe(task=task)


def base_policy_folder(recipe: BaseRecipe, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_root()
    return root / f"base-{recipe.digest()}"


def is_built(folder: Path) -> bool:
    return (folder / "aepo_base.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_base_policy(
    task: SyntheticTaskConfig, cache_dir: str | Path | None = None, force: bool = False, log=print
) -> Path:
    """The cached base policy for this task recipe, built first if missing (or if `force`)."""
    recipe = recipe_for(task)
    folder = base_policy_folder(recipe, cache_dir)
    if force or not is_built(folder):
        if log:
            log(f"building the base policy into {folder} (one-off, a few minutes on a CPU)")
        build_base_policy(recipe, folder, log=log)
    return folder


@torch.no_grad()
def profile_policy(
    folder: str | Path, task: SyntheticTaskConfig, num_prompts: int = 128, n: int = 8, seed: int = 0,
    max_new_tokens: int = 48, device: str = "cpu",
) -> dict[str, float]:
    """What a policy does on the held-out split of the embedded task, sampled at T = 1.

    Returns accuracy (avg@n), the token-mean nll entropy (nats/token) of the sampled responses, the
    valid-choice metrics and ``uniform_valid_entropy`` (the upper reference of a correct policy) of
    :func:`synthetic.task_profile`.
    """
    from aepo_core.io.engines.base import SamplingRequest
    from aepo_core.io.engines.hf import HFRolloutEngine
    from aepo_core.io.models import load_policy, load_tokenizer
    from aepo_core.io.verifiers import SyntheticVerifier

    tokenizer = load_tokenizer(folder)
    model = load_policy(folder, device=torch.device(device))
    _, held_out = synthetic.make_splits(task.seed, task.n_train, task.n_eval, task.min_terms, task.max_terms, task.max_value)
    problems = held_out[:num_prompts]
    prompts = [chat_prompt_ids(tokenizer, p.prompt) for p in problems]
    engine = HFRolloutEngine(model, tokenizer)
    out = engine.generate([SamplingRequest(ids, n=n, max_new_tokens=max_new_tokens) for ids in prompts], seed=seed)
    judged = SyntheticVerifier().judge_batch([c.text for c in out], [problems[c.request_index].answer for c in out])
    logp = [lp for c in out for lp in c.logprobs]
    stats = synthetic.task_profile(
        model, tokenizer, [prompts[c.request_index] for c in out], [c.token_ids for c in out],
        [problems[c.request_index].terms for c in out],
    )
    return {
        "accuracy": sum(j.reward for j in judged) / len(judged),
        "entropy_nll": -sum(logp) / len(logp),
        "response_tokens": len(logp) / len(out),
        "uniform_valid_entropy": stats.pop("choice/uniform_valid_entropy"),
        **stats,
    }
