import time

import pytest

from aepo_core.io.verifiers import (
    MathVerifier,
    SyntheticVerifier,
    final_answer,
    last_box,
    make_verifier,
    number_value,
    stated_number,
)

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
        ("Answer: 24", "not a number", 0.0, "bad_gold", "24"),  # the gold's fault, not the model's
        ("Answer: 24", "", 0.0, "bad_gold", "24"),
        ("Answer: 4", "4.0", 1.0, "correct", "4"),  # values compare, whatever the gold's spelling
        ("Answer: 18446744073709551617", "18446744073709551617", 1.0, "correct", "18446744073709551617"),
        ("Answer: 18446744073709551616", "18446744073709551617", 0.0, "wrong", "18446744073709551616"),
        ("Answer: 24. Answer: {{{", "24", 0.0, "no_answer", None),  # the last answer stated is garbage
        ("Answer: 3 or 24", "24", 0.0, "no_answer", None),  # several candidates: none counts
        ("7+5=12, 12+9=21, 21+3=24\n24", "24", 1.0, "correct", "24"),  # a last line that is one number
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
        ("\\boxed{\\frac{1}{2}", "1/2", 0.0),  # unterminated box: no final answer
        ("\\boxed{{{2}}}", "2", 1.0),  # nested braces
        (MB + " \\boxed{7}", "7", 1.0),  # 1 MB of text before the answer
    ]
    got = math_verifier.judge_batch([c[0] for c in cases], [c[1] for c in cases])
    for (text, gold, want), j in zip(cases, got, strict=True):
        assert j.reward in (0.0, 1.0)
        if want is not None:
            assert j.reward == want, (text[-60:], gold, j)
    assert got[0].verdict == "correct" and got[2].verdict == "wrong"
    assert got[3].verdict == "no_answer" and got[5].verdict == "no_answer"


def test_math_verifier_is_quiet_about_the_timeouts_it_switches_off(capfd, caplog, monkeypatch):
    """math-verify warns once per process that its own timeouts are off; they are off on purpose
    (the verifier's deadline bounds each item), so neither its workers nor this process print it."""
    import math_verify.parser

    from aepo_core.io.verifiers import parse_math

    monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False)
    assert parse_math("1/2")
    v = MathVerifier(timeout_s=20.0, workers=1)  # a fresh worker process, which would warn once
    try:
        assert [j.verdict for j in v.judge_batch(["\\boxed{2}", "\\boxed{3}"], ["2", "2"])] == ["correct", "wrong"]
    finally:
        v.close()
    printed = capfd.readouterr()
    assert "Timeout is disabled" not in printed.out + printed.err
    assert not [r for r in caplog.records if "Timeout is disabled" in r.getMessage()]


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


@pytest.mark.parametrize(
    ("text", "has_box", "content"),
    [
        ("so \\boxed{\\$18.90}", True, "\\$18.90"),
        ("First guess \\boxed{5}. Wait, recheck: the answer is \\boxed{7", True, None),  # cut inside the last box
        ("\\boxed{5} then \\boxed 7", True, "7"),
        ("\\fbox{42}", True, "42"),
        ("$\\boxed 42$.", True, "42"),
        ("\\boxed{\\text{(B)}}", True, "\\text{(B)}"),
        ("\\boxed{\\frac{a}{\\sqrt{b}}}", True, "\\frac{a}{\\sqrt{b}}"),
        ("\\boxed {3}", True, "3"),
        ("\\boxed{\\{1,2\\}}", True, "\\{1,2\\}"),  # escaped braces do not close the box
        ("\\boxed{\\}", True, None),
        ("\\boxed{ }", True, None),  # an empty box states nothing
        ("ends with \\boxed", True, None),
        ("\\boxedx{3} no box", False, None),
        ("\\boxed{5}. Wait, it is \\boxe", True, None),  # cut off inside the last box command's name
        ("\\boxed{5}. Wait, it is \\fb", True, None),
        ("\\boxed{5}. Then \\frac", True, "5"),  # not a box command
        ("\\framebox[2cm][c]{42}", True, "42"),
        ("\\boxed{5} then \\framebox[2cm", True, None),
        ("the answer is 3", False, None),
    ],
)
def test_last_box(text, has_box, content):
    assert last_box(text) == (has_box, content)


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("so the answer is 6.", "6"),
        ("so the answer is 12!", None),  # 12! is not 12
        ("**Final Answer**\n42", "42"),
        ("answer = -7", "-7"),
        ("The final answer is: **6**", "6"),
        ("Answer: 3 ... on second thought Answer: 24", "24"),
        ("We get\n$-3/4$\n", "-3/4"),
        ("the answer is 1,000", "1,000"),
        ("The answer is 6.\nHope this helps!", "6"),  # an answer phrase decides, wherever it is
        ("I think 3, 4, 5 or 6", None),  # several candidates
        ("The answer is 3 or 6", None),
        ("x8#@ 12 zz", None),  # garbage around a number
        ("the answer is 6 apples\n6", None),  # the stated answer is not one number
        ("Answer: " + "9" * 100, None),
        ("", None),
    ],
)
def test_stated_number(text, number):
    assert stated_number(text) == number


def test_final_answer_modes():
    truncated = "First guess \\boxed{5}. Wait, recheck: the answer is \\boxed{7"
    assert final_answer(truncated, "boxed_or_last_number") is None  # an unterminated box never falls back
    assert final_answer("so the answer is 6", "boxed") is None  # no box: no answer by default
    assert final_answer("so the answer is 6", "boxed_or_last_number") == "6"
    assert final_answer("\\boxed{4}\nthe answer is 6", "boxed_or_last_number") == "4"  # a box wins
    assert number_value("2.50") == number_value("2.5") and number_value("x") is None and number_value("1/0") is None
    with pytest.raises(ValueError, match="unknown math answer mode"):
        MathVerifier(answer_mode="last")  # type: ignore[arg-type]


def test_math_verifier_final_answer_and_gold_rules(math_verifier):
    # (response, gold, reward, verdict) - hand values
    cases = [
        ("so \\boxed{\\$18.90}", "\\$18.90", 1.0, "correct"),  # money gold: read once wrapped in math mode
        ("\\boxed{5}", "\\$5", 1.0, "correct"),
        ("\\boxed{5\\%}", "5\\%", 1.0, "correct"),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0, "correct"),
        ("\\boxed{3}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0.0, "wrong"),  # a tuple gold is not read as its first part
        ("\\boxed{5}", "\\boxed{5}", 1.0, "correct"),  # a gold that holds its own box
        ("\\boxed{18446744073709551617}", "18446744073709551617", 1.0, "correct"),
        ("\\boxed{18446744073709551616}", "18446744073709551617", 0.0, "wrong"),
        ("First guess \\boxed{5}. Wait, recheck: the answer is \\boxed{7", "5", 0.0, "no_answer"),
        ("\\fbox{42}", "42", 1.0, "correct"),
        ("so $\\boxed 42$", "42", 1.0, "correct"),
        ("\\boxed{\\text{(B)}}", "(B)", 1.0, "correct"),
        ("\\boxed{{{2}}}", "2", 1.0, "correct"),
        ("I think 3, 4, 5 or 6", "6", 0.0, "no_answer"),  # no box: no credit by default
        ("x8#@ 12 zz", "12", 0.0, "no_answer"),
        ("so the answer is 6", "6", 0.0, "no_answer"),
        ("\\boxed{6}", "???", 0.0, "bad_gold"),  # a gold nothing can read is reported, not scored wrong
        ("\\boxed{6}", "", 0.0, "bad_gold"),
        ("\\boxed{6}", "\\$\\$", 0.0, "bad_gold"),
    ]
    got = math_verifier.judge_batch([c[0] for c in cases], [c[1] for c in cases])
    assert [(j.reward, j.verdict) for j in got] == [(c[2], c[3]) for c in cases]
    assert got[0].extracted == "\\$18.90" and got[16].extracted == "6"


def test_math_verifier_last_number_fallback_is_opt_in():
    v = make_verifier("math", "boxed_or_last_number")
    try:
        cases = [
            ("so the answer is 6.", "6", 1.0, "correct"),
            ("We get\n$42$", "42", 1.0, "correct"),
            ("so the answer is 7.", "6", 0.0, "wrong"),
            ("I think 3, 4, 5 or 6", "6", 0.0, "no_answer"),  # several candidate answers: never credited
            ("The answer is 3 or 6", "6", 0.0, "no_answer"),
            ("x8#@ 12 zz", "12", 0.0, "no_answer"),
            ("First guess \\boxed{5}. Wait, the answer is \\boxed{7", "5", 0.0, "no_answer"),
            ("\\boxed{4}. So the answer is 6", "6", 0.0, "wrong"),  # a box is the final answer when there is one
        ]
        got = v.judge_batch([c[0] for c in cases], [c[1] for c in cases])
    finally:
        v.close()
    assert [(j.reward, j.verdict) for j in got] == [(c[2], c[3]) for c in cases]


def test_reward_stage_reports_bad_golds(tmp_path):
    """A gold the verifier cannot read: verdict bad_gold, reward 0, counted in the reward stage's
    metrics with the prompt ids in its manifest, and a warning naming them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aepo_core.config import load_config, save_config
    from aepo_core.pipeline.rundir import RunDir
    from aepo_core.pipeline.stages import reward

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    save_config(load_config(None, ["rollout.n=2", "rollout.prompts_per_batch=3"]), run.config_path)
    prompts = pa.table({"id": ["p-ok", "p-bad", "p-empty"], "prompt": ["a", "b", "c"], "answer": ["3", "n/a", " "],
                        "source": ["s"] * 3, "prompt_index": pa.array([0, 1, 2], pa.int32())})
    with run.publish(0, "prepare", {}) as (tmp, _):
        pq.write_table(prompts, tmp / "prompts.parquet")
    rollouts = pa.table({"row_id": list(range(6)), "prompt_index": [0, 0, 1, 1, 2, 2], "batch": ["policy"] * 6,
                         "text": ["Answer: 3", "Answer: 4", "Answer: 3", "Answer: n/a", "Answer: 1", "x"]})
    with run.publish(0, "rollout", {}) as (tmp, _):
        pq.write_table(rollouts, tmp / "rollouts.parquet")
    with pytest.warns(UserWarning, match=r"2 prompt\(s\) have a gold answer .* cannot read .*'p-bad', 'p-empty'"):
        metrics = reward(run, 0)
    table = pq.read_table(run.stage_dir(0, "reward") / "rewards.parquet")
    assert table.column("verdict").to_pylist() == ["correct", "wrong", "bad_gold", "bad_gold", "bad_gold", "bad_gold"]
    assert table.column("reward").to_pylist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert metrics["bad_gold"] == 4 and metrics["bad_gold_prompts"] == 2
    assert run.manifest(0, "reward")["params"] == {"bad_gold_prompt_ids": ["p-bad", "p-empty"]}
