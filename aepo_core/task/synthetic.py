"""The embedded verifiable task: add a list of small numbers, showing a running sum, in any order.

    prompt:   "Add: 7 5 9 3"
    response: "7+5=12, 12+9=21, 21+3=24. Answer: 24"      (one of 4! valid orders)

Every permutation of the terms is a correct worked trace, so a prompt has many valid responses and the
policy's entropy measures real exploration, not only arithmetic noise. Harder prompts (more terms)
need more carry steps, which spreads the per-prompt accuracy of a partly trained policy: GRPO groups
are then mixed, and the advantage has something to work with. The reward comes from the verifier in
`aepo_core.io.verifiers`, which reads the final answer and compares its value, never a reference string.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pyarrow as pa

from aepo_core.config import SyntheticTaskConfig
from aepo_core.io.datasets import SCHEMA

PROMPT_PREFIX = "Add: "


@dataclass(frozen=True)
class Problem:
    id: str
    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return PROMPT_PREFIX + " ".join(str(t) for t in self.terms)

    @property
    def answer(self) -> str:
        return str(sum(self.terms))


def generate_problems(
    n: int, seed: int, min_terms: int, max_terms: int, max_value: int, id_prefix: str
) -> list[Problem]:
    """n problems drawn from `seed`: each has min_terms..max_terms terms in 1..max_value."""
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    rng = random.Random(seed)
    return [
        Problem(
            id=f"{id_prefix}-{i:06d}",
            terms=tuple(rng.randint(1, max_value) for _ in range(rng.randint(min_terms, max_terms))),
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


def worked_trace(terms: tuple[int, ...] | list[int], rng: random.Random) -> str:
    """A correct response: the terms in a random order, accumulated left to right."""
    order = list(terms)
    rng.shuffle(order)
    total = order[0]
    steps = []
    for t in order[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    return ", ".join(steps) + f". Answer: {total}"


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
