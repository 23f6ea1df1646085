import time

import pytest

from aepo_core.verifiers import MathVerifier, SyntheticVerifier, make_verifier

MB = "x" * (1 << 20)


@pytest.mark.parametrize(
    ("text", "gold", "reward", "verdict", "extracted"),
    [
        ("7+5=12, 12+9=21, 21+3=24. Answer: 24", "24", 1.0, "correct", "24"),
        ("9+3=12, 12+7=19, 19+5=24. Answer: 24", "24", 1.0, "correct", "24"),  # another valid order
        ("Answer: 024", "24", 1.0, "correct", "024"),  # value, not string, equality
        ("7+5=12, 12+9=21. Answer: 21", "24", 0.0, "wrong", "21"),
        ("Answer: 3 ... on second thought Answer: 24", "24", 1.0, "correct", "24"),  # the last answer counts
        ("7+5=12, 12+9=21", "24", 0.0, "no_answer", None),
        ("", "24", 0.0, "no_answer", None),
        ("Answer: {{{24}}}", "24", 0.0, "no_answer", None),
        ("Answer: " + "9" * 5000, "24", 0.0, "no_answer", None),  # absurd number: not an answer, no crash
        (MB + " Answer: 24", "24", 1.0, "correct", "24"),
        ("Answer: 24" + MB, "24", 0.0, "no_answer", None),  # the answer is not in the response's tail
        ("Answer: 24", "not a number", 0.0, "error", "24"),
    ],
)
def test_synthetic_verifier(text, gold, reward, verdict, extracted):
    j = SyntheticVerifier().judge(text, gold)
    assert (j.reward, j.verdict, j.extracted) == (reward, verdict, extracted)


def test_synthetic_verifier_rejects_non_text():
    assert SyntheticVerifier().judge(None, "3").verdict == "error"  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def math_verifier():
    v = MathVerifier(timeout_s=20.0, workers=2)
    yield v
    v.close()


def test_math_verifier_cases(math_verifier):
    cases = [
        ("so the result is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("the answer is \\boxed{0.5}", "1/2", 1.0),
        ("\\boxed{3}", "4", 0.0),
        ("no boxed answer and no math at all", "4", 0.0),
        ("", "4", 0.0),
        ("\\boxed{\\frac{1}{2}", "1/2", None),  # unbalanced brace: any verdict, but no crash
        ("\\boxed{{{2}}}", "2", 1.0),  # nested braces
        (MB + " \\boxed{7}", "7", 1.0),  # 1 MB of text before the answer
    ]
    got = math_verifier.judge_batch([c[0] for c in cases], [c[1] for c in cases])
    for (text, gold, want), j in zip(cases, got, strict=True):
        assert j.reward in (0.0, 1.0)
        if want is not None:
            assert j.reward == want, (text[-60:], gold, j)
    assert got[0].verdict == "correct" and got[2].verdict == "wrong"
    assert got[3].verdict in ("no_answer", "wrong")


HANG_S = 600


def _stuck_on_hang(response: str, gold: str):
    """Stands in for math-verify stuck in sympy on one input."""
    if response == "hang":
        time.sleep(HANG_S)
    return (1.0, "correct", response) if response == gold else (0.0, "wrong", response)


def test_math_verifier_deadline_bounds_a_stuck_item():
    v = MathVerifier(timeout_s=2.0, workers=2, judge_fn=_stuck_on_hang)
    try:
        started = time.perf_counter()
        got = v.judge_batch(["1", "hang", "3", "4"], ["1", "2", "3", "5"])
        elapsed = time.perf_counter() - started
    finally:
        v.close()
    assert [j.verdict for j in got] == ["correct", "timeout", "correct", "wrong"]
    assert elapsed < HANG_S  # the stuck worker was killed, not waited for (no bound on the machine's speed)


def test_make_verifier_unknown_kind():
    with pytest.raises(ValueError, match="unknown verifier 'regex'"):
        make_verifier("regex")
