"""The embedded task's choice metrics, by hand: where a response picks a term, what was valid there,
the probability and entropy among the valid terms, and the uniform-valid ceiling."""

import math
import random

import pytest
import torch

from aepo_core.task.synthetic import (
    Problem,
    choice_positions,
    sample_order,
    trace_of_order,
    uniform_valid_entropy,
    valid_choice_stats,
)

PLUS = 100
DIGITS = list(range(10))  # digit d is token d
EQ, DOT = 101, 102


def _ids(text: str) -> list[int]:
    return [PLUS if c == "+" else EQ if c == "=" else DOT if c == "." else int(c) for c in text]


def test_choice_positions_track_the_terms_left():
    # "3+1=4+2=6": choices at 0 (3 of {1,2,3}), 2 (1 of {1,2}), 6 (2 of {2})
    assert choice_positions((1, 2, 3), _ids("3+1=4+2=6."), PLUS, DIGITS) == [(0, [1, 2, 3]), (2, [1, 2]), (6, [2])]
    # a repeated term is invalid and takes nothing; a term after the last is a choice with nothing valid
    assert choice_positions((1, 2), _ids("1+1=2+2=4+5=9"), PLUS, DIGITS) == [(0, [1, 2]), (2, [2]), (6, [2]), (10, [])]


def test_valid_choice_stats_by_hand():
    # V = 4 tokens; valid {0, 1}; p = (0.5, 0.25, 0.25, 0): p_valid 0.75, q = (2/3, 1/3)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 1e-30], [0.25, 0.25, 0.25, 0.25]]))
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    p_valid, h_valid = valid_choice_stats(logits, valid)
    q = torch.tensor([2 / 3, 1 / 3])
    assert p_valid.tolist() == pytest.approx([0.75, 1.0])
    assert h_valid.tolist() == pytest.approx([float(-(q * q.log()).sum()), math.log(4)], rel=1e-6)


def test_uniform_valid_entropy_is_log_factorial_per_token():
    problems = [Problem("a", (1, 2, 3)), Problem("b", (4, 5))]
    length = {3: 10, 2: 6}
    got = uniform_valid_entropy(problems, lambda p: length[len(p.terms)])
    assert got == pytest.approx((math.log(6) + math.log(2)) / 16)


def test_sample_order_bias():
    rng = random.Random(0)
    assert sample_order((4, 5, 6), rng, 1.0) == [4, 5, 6]
    orders = [tuple(sample_order((1, 2, 3), rng, 0.0)) for _ in range(3000)]
    assert len(set(orders)) == 6 and max(orders.count(o) for o in set(orders)) < 600  # ~500 each
    first = [sample_order((1, 2, 3), rng, 0.5)[0] for _ in range(3000)]
    assert first.count(1) / 3000 == pytest.approx(0.5 + 0.5 / 3, abs=0.03)
    assert trace_of_order([9, 8]) == "9+8=7. Answer: 7"
