"""The embedded verifiable task: add distinct digits modulo 10, one term per step, in any order.

    prompt:   "Add mod 10: 7 5 9 3"
    response: "7+5=2+9=1+3=4. Answer: 4"      (one of 4! = 24 valid orders)

Every order of the terms is a correct worked trace, and the trace is almost all choice: per step one
token picks the next term (a *choice position*), three tokens do one-digit arithmetic (`+`, `=`, the
running sum mod 10). The terms are distinct, so at a choice position with m terms left there are
exactly m valid next tokens, and a policy that answers correctly can still spread up to log(m) nats
there: its entropy measures exploration among correct answers, not noise. What the task knows about
this is exported for the metrics: `choice_positions` / `valid_next_terms` (the valid-choice entropy
and the probability on valid choices, logged per iteration) and `uniform_valid_entropy` (the entropy
of a policy that picks uniformly among the valid next terms: the upper reference of a correct policy).
The reward comes from the verifier in `aepo_core.io.verifiers`, which reads the final answer
("Answer: N") and compares its value, never a reference string.

The old task (running sums without the modulus, repeated terms, a boilerplate "12+9=21, " step) made
most of the base policy's entropy wrong choices; docs/results.md keeps what it showed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import Tensor

from aepo_core.config import SyntheticTaskConfig
from aepo_core.io.datasets import SCHEMA

MODULUS = 10
PROMPT_PREFIX = f"Add mod {MODULUS}: "


@dataclass(frozen=True)
class Problem:
    id: str
    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return PROMPT_PREFIX + " ".join(str(t) for t in self.terms)

    @property
    def answer(self) -> str:
        return str(sum(self.terms) % MODULUS)


def generate_problems(
    n: int, seed: int, min_terms: int, max_terms: int, max_value: int, id_prefix: str
) -> list[Problem]:
    """n problems drawn from `seed`: each has min_terms..max_terms DISTINCT terms in 1..max_value
    (distinct, so the valid next terms at a choice position are exactly the ones not yet used)."""
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    if not max_terms <= max_value <= 9:
        raise ValueError(f"need max_terms <= max_value <= 9 (distinct one-digit terms), got {max_terms}, {max_value}")
    rng = random.Random(seed)
    return [
        Problem(
            id=f"{id_prefix}-{i:06d}",
            terms=tuple(rng.sample(range(1, max_value + 1), rng.randint(min_terms, max_terms))),
        )
        for i in range(n)
    ]


def make_splits(
    seed: int, n_train: int, n_eval: int, min_terms: int, max_terms: int, max_value: int
) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out splits; held-out prompts never occur in train (their term lists differ)."""
    eval_split = generate_problems(n_eval, seed + 1, min_terms, max_terms, max_value, "eval")
    held_out = {p.terms for p in eval_split}
    train: list[Problem] = []
    candidates = generate_problems(2 * n_train + 1000, seed, min_terms, max_terms, max_value, "cand")
    for p in candidates:
        if p.terms not in held_out:
            train.append(Problem(id=f"train-{len(train):06d}", terms=p.terms))
            if len(train) == n_train:
                break
    if len(train) < n_train:
        raise ValueError(
            f"the task space is too small for {n_train} training prompts distinct from the held-out split; "
            "raise max_value or max_terms"
        )
    return train, eval_split


def trace_of_order(order: tuple[int, ...] | list[int]) -> str:
    """The response that takes the terms in `order`: "7+5=2+9=1+3=4. Answer: 4" (sums mod 10)."""
    total = order[0] % MODULUS
    text = str(order[0])
    for t in order[1:]:
        total = (total + t) % MODULUS
        text += f"+{t}={total}"
    return text + f". Answer: {total}"


def sample_order(terms: tuple[int, ...] | list[int], rng: random.Random, order_bias: float = 0.0) -> list[int]:
    """An order of the terms: at each step, with probability `order_bias` the first term left in the
    prompt's order, else one of the terms left uniformly (so 0.0 is a uniformly random order)."""
    left = list(terms)
    order = []
    while left:
        pick = 0 if rng.random() < order_bias else rng.randrange(len(left))
        order.append(left.pop(pick))
    return order


def worked_trace(terms: tuple[int, ...] | list[int], rng: random.Random, order_bias: float = 0.0) -> str:
    """A correct response: the terms in an order drawn by `sample_order`, accumulated left to right."""
    return trace_of_order(sample_order(terms, rng, order_bias))


def parse_terms(prompt: str) -> tuple[int, ...] | None:
    """The terms of a synthetic prompt, or None when the text is not one."""
    if not prompt.startswith(PROMPT_PREFIX):
        return None
    try:
        return tuple(int(t) for t in prompt[len(PROMPT_PREFIX):].split())
    except ValueError:
        return None


def synthetic_table(t: SyntheticTaskConfig, split: str) -> pa.Table:
    """The embedded task's split ("train" or the held-out "eval") as the normalised prompt table."""
    train, held_out = make_splits(t.seed, t.n_train, t.n_eval, t.min_terms, t.max_terms, t.max_value)
    problems = train if split == "train" else held_out
    return pa.table(
        {
            "id": [p.id for p in problems],
            "prompt": [p.prompt for p in problems],
            "answer": [p.answer for p in problems],
            # the number of terms is the task's difficulty: the evaluation breaks accuracy down by it
            "source": [f"synthetic-{len(p.terms)}-terms" for p in problems],
        },
        schema=SCHEMA,
    )


# ------------------------------------------------------------------------------ choice metrics
def choice_positions(terms: tuple[int, ...], response_ids: list[int], plus_id: int, digit_ids: list[int]) -> list[tuple[int, list[int]]]:
    """Where a response picks its next term, and which tokens were valid there.

    Args:
        terms: the prompt's distinct terms.
        response_ids: the sampled response's token ids (EOS and padding may follow).
        plus_id: the token id of "+".
        digit_ids: digit_ids[d] is the token id of the digit d (0..9).
    Returns:
        [(i, valid_ids)]: response position i is a choice position (the first token, and every token
        after a "+"), predicted from the logits at position i - 1 of the response (the last prompt
        token for i = 0); valid_ids are the token ids of the terms not yet taken at earlier choice
        positions (empty once every term is used: any further term is invalid).
    """
    left = set(terms)
    out = []
    for i, tok in enumerate(response_ids):
        if i == 0 or response_ids[i - 1] == plus_id:
            out.append((i, [digit_ids[t] for t in sorted(left)]))
            digit = digit_ids.index(tok) if tok in digit_ids else None
            left.discard(digit)
    return out


def valid_choice_stats(logits: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Probability on the valid choices and the entropy among them, at choice positions.

    Args:
        logits: [N, V] next-token logits at N choice positions (T = 1).
        valid: [N, V] bool, the valid next tokens (at least one per row).
    Returns:
        (p_valid [N]: total probability on valid tokens, h_valid [N]: the entropy in nats of the
        policy restricted to the valid tokens and renormalised, -sum_v q_v log q_v with
        q = p / p_valid over the valid v).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    masked = logp.masked_fill(~valid, float("-inf"))
    log_p_valid = torch.logsumexp(masked, dim=-1)  # [N]
    logq = masked - log_p_valid.unsqueeze(-1)
    q = logq.exp()
    h_valid = -(q * logq.masked_fill(~valid, 0.0)).sum(-1)
    return log_p_valid.exp(), h_valid


def response_tokens(tokenizer, problem: Problem) -> int:
    """Length in tokens of a correct response to `problem`, EOS included (as in the update's response
    mask); the same for every order of the terms."""
    return len(tokenizer.encode(trace_of_order(problem.terms), add_special_tokens=False)) + 1


def uniform_valid_entropy(problems: list[Problem], tokens_per_response) -> float:
    """Token-mean entropy (nats/token, T = 1) of the policy that picks uniformly among the valid next
    terms and does the arithmetic right: sum over prompts of log(n!) / sum of response tokens.

    The entropy of a *correct* policy is at most this (its only freedom is the order); the token mean
    matches the `entropy/*` estimators (weights by tokens). `tokens_per_response(problem)` is the
    length in tokens of its response, EOS included (the same for every order).
    """
    nats = sum(math.lgamma(len(p.terms) + 1) for p in problems)
    tokens = sum(tokens_per_response(p) for p in problems)
    return nats / tokens


def task_token_ids(tokenizer) -> tuple[int, list[int]]:
    """(id of "+", [id of digit d for d in 0..9]) in `tokenizer`; ValueError if one is not a single token."""
    ids = []
    for text in ["+"] + [str(d) for d in range(10)]:
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"the tokenizer splits {text!r} into {len(enc)} tokens: not the embedded task's tokenizer")
        ids.append(enc[0])
    return ids[0], ids[1:]


@torch.no_grad()
def choice_metrics(
    model, tokenizer, prompt_ids: list[list[int]], response_ids: list[list[int]], terms: list[tuple[int, ...]],
    batch_size: int = 64,
) -> dict[str, float]:
    """The valid-choice metrics of sampled responses under `model` (T = 1), means over choice positions.

    Args:
        model: HF causal LM ([b, L] ids -> [b, L, V] logits).
        tokenizer: the embedded task's tokenizer (see `task_token_ids`).
        prompt_ids, response_ids: [R] token-id lists of each row (response without padding).
        terms: [R] the prompt's terms of each row.
    Returns:
        {"choice/valid_prob": mean probability on the valid next terms, "choice/valid_entropy": mean
        entropy (nats) among the valid next terms (positions with at least one valid term),
        "choice/valid_rate": fraction of sampled choices that were valid, "choice/positions": count}.
        Empty when no row has a choice position.
    """
    plus_id, digit_ids = task_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    p_sum = h_sum = ok = 0.0
    n_pos = n_h = 0
    try:
        for start in range(0, len(prompt_ids), batch_size):
            rows = range(start, min(start + batch_size, len(prompt_ids)))
            seqs = [prompt_ids[r] + response_ids[r] for r in rows]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(seqs):  # right padding: positions are those of the unpadded rows
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            picked, valid_rows, chosen_valid = [], [], []
            for j, r in enumerate(rows):
                for i, valid in choice_positions(terms[r], response_ids[r], plus_id, digit_ids):
                    picked.append(logits[j, len(prompt_ids[r]) + i - 1])
                    row = torch.zeros(logits.shape[-1], dtype=torch.bool)
                    row[valid] = True
                    valid_rows.append(row)
                    chosen_valid.append(response_ids[r][i] in valid)
            if not picked:
                continue
            valid = torch.stack(valid_rows).to(device)
            p_valid, h_valid = valid_choice_stats(torch.stack(picked), valid)
            has_valid = valid.any(-1)
            p_sum += float(p_valid.sum())
            h_sum += float(h_valid[has_valid].sum())
            n_h += int(has_valid.sum())
            n_pos += len(picked)
            ok += sum(chosen_valid)
    finally:
        model.train(was_training)
    if n_pos == 0:
        return {}
    return {
        "choice/valid_prob": p_sum / n_pos,
        "choice/valid_entropy": h_sum / max(n_h, 1),
        "choice/valid_rate": ok / n_pos,
        "choice/positions": float(n_pos),
    }


def task_profile(
    model, tokenizer, prompt_ids: list[list[int]], response_ids: list[list[int]], terms: list[tuple[int, ...]]
) -> dict[str, float]:
    """:func:`choice_metrics` of sampled rows plus ``choice/uniform_valid_entropy``: the entropy
    (nats/token) of a policy that answers right and picks uniformly among the valid next terms on the
    rows' prompts, the most a correct policy can have (the upper reference of the entropy targets).
    What the update stage logs each iteration and `aepo build-base` reports for the base policy.

    Args: as :func:`choice_metrics` ([R] rows each).
    """
    out = choice_metrics(model, tokenizer, prompt_ids, response_ids, terms)
    out["choice/uniform_valid_entropy"] = uniform_valid_entropy(
        [Problem("", tuple(t)) for t in terms], lambda p: response_tokens(tokenizer, p)
    )
    return out
