"""HF transformers rollout engine: a KV-cached sampling loop with a temperature and top-p per row.

`model.generate` takes one temperature per call; AEPO needs the policy batch (T=1) and the regulariser
batch (T_high or T_low) in one pass, so this engine runs its own loop: left-padded prompts, one forward
pass per generated token over the unfinished rows only (a finished row leaves the batch and its KV
cache rows are dropped), sampling done on the whole running batch as tensor ops.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from aepo_core.io.engines.base import Completion, SamplingRequest


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    Args:
        logits: [R, V] next-token logits (float32).
        temperature: [R] per-row temperature; 0 means greedy.
        top_p: [R] per-row nucleus mass in (0, 1].
        generator: one generator for the batch, or one per row (R of them: each row's draw then
            depends on its own stream only, not on the other rows).
    Returns:
        tokens [R] (int64) and their log-probs [R] under the distribution sampled from (greedy rows: T=1).
    """
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    logp = torch.log_softmax(scaled, dim=-1)
    if bool((top_p < 1).any()):
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        drop_sorted = mass_before >= top_p.unsqueeze(-1)  # keeps at least the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    probs = logp.exp()
    if isinstance(generator, list):
        sampled = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generator)])
    else:
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class HFRolloutEngine:
    """Samples from an in-memory HF causal LM. `batch_size` caps the rows sampled together."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        # transformers 5.x renamed the KV-cache argument from past_key_values to cache.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, folder: str | Path) -> None:
        fresh = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=self.model.dtype, trust_remote_code=getattr(self.model.config, "trust_remote_code", False)
        )
        self.model.load_state_dict(fresh.state_dict())

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]

    def generate(self, requests: list[SamplingRequest], seed: int, first_index: int = 0) -> list[Completion]:
        rows = [(i, j, req) for i, req in enumerate(requests, start=first_index) for j in range(req.n)]
        if not rows:
            return []
        # one random stream per response, from its request's seed (or the call's seed and the request's
        # position) and its sample index: a row's tokens never depend on the other rows in the batch
        generators = [
            torch.Generator(device=self.device).manual_seed(row_seed(seed if req.seed is None else req.seed,
                                                                     i if req.seed is None else 0, j))
            for i, j, req in rows
        ]
        step = self.batch_size or len(rows)
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), desc="rollout", unit="resp", leave=False)
        out: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rows), step):
                out.extend(self._generate_rows(rows[start : start + step], generators[start : start + step], bar))
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        return out

    @torch.inference_mode()
    def _generate_rows(self, rows, generators: list[torch.Generator], bar=None) -> list[Completion]:
        device = self.device
        prompts = [req.prompt_token_ids for _, _, req in rows]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, width - len(p) :] = torch.tensor(p)
            attention[r, width - len(p) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        temperature = torch.tensor([req.temperature for _, _, req in rows], dtype=torch.float32, device=device)
        top_p = torch.tensor([req.top_p for _, _, req in rows], dtype=torch.float32, device=device)
        budget = torch.tensor([req.max_new_tokens for _, _, req in rows], device=device)
        eos = torch.tensor(self.eos_ids, device=device)

        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        cache, logits = _cache_of(out), out.logits[:, -1, :].float()
        position = positions[:, -1:]
        # [R, max budget] results; rows that finish leave the running batch (and the KV cache), so a
        # step costs what the rows still generating cost, not what the longest row's batch did
        steps = int(budget.max())
        token_mat = torch.full((len(rows), steps), self.pad_id, dtype=torch.long, device=device)
        logp_mat = torch.zeros((len(rows), steps), dtype=torch.float32, device=device)
        active = torch.arange(len(rows), device=device)  # batch rows still generating, in order
        for t in range(steps):
            token, logp = sample_tokens(logits, temperature[active], top_p[active], [generators[r] for r in active.tolist()])
            token_mat[active, t] = token
            logp_mat[active, t] = logp.float()
            done = torch.isin(token, eos) | (budget[active] <= t + 1)
            if bar is not None:
                bar.update(int(done.sum()))
            if bool(done.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            position = position + 1
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(-1)
                active, token, attention, position = active[keep], token[keep], attention[keep], position[keep]
                cache.batch_select_indices(keep)
            out = self.model(
                input_ids=token.unsqueeze(-1),
                attention_mask=attention,
                position_ids=position,
                use_cache=True,
                **{self._cache_arg: cache},
            )
            cache, logits = _cache_of(out), out.logits[:, -1, :].float()

        token_mat, logp_mat = token_mat.cpu(), logp_mat.cpu()
        eos_set = set(self.eos_ids)
        completions = []
        for r, (i, j, req) in enumerate(rows):
            ids = token_mat[r, : req.max_new_tokens].tolist()
            length = next((k + 1 for k, tok in enumerate(ids) if tok in eos_set), None)
            reason = "stop" if length is not None else "length"
            ids = ids[: length or len(ids)]
            completions.append(
                Completion(
                    request_index=i,
                    sample_index=j,
                    temperature=req.temperature,
                    token_ids=ids,
                    logprobs=logp_mat[r, : len(ids)].tolist(),
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason=reason,
                )
            )
        return completions


def row_seed(seed: int, request: int, sample: int) -> int:
    """The seed of one response's random stream: a hash of (seed, request position, sample index)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{request}/{sample}".encode()).digest()[:8], "little") >> 1


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's (may be a list)."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("the tokenizer and model define no EOS token; cannot tell where a response ends")
    return ids
