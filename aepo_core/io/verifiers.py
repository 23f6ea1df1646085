"""Reward verifiers: response text + gold answer -> 0/1 reward, verdict and the extracted answer.

What counts as a response's final answer (docs/architecture.md, "Reward rules"):

* `final_box(text)`: the content of the LAST box in the response — `\\boxed{...}`, `\\fbox{...}` (nested
  and escaped braces allowed) or `\\boxed 42` (the token after the space). A response whose last box is
  unterminated (cut off inside `\\boxed{`) has no final answer: an earlier box it moved on from never
  counts.
* `stated_number(text)`: a single number stated as the answer — the last "answer is N" / "Answer: N"
  phrase decides when there is one (the rest of its line must be exactly one number, optionally in
  `$...$`, bold, or followed by a full stop); without such a phrase, the last non-empty line must be
  exactly one number. Several candidates ("3, 4, 5 or 6") or garbage ("x8#@ 12 zz") are no answer.

The math verifier reads `final_box` (data.math_answer = "boxed", the default) and, only with
"boxed_or_last_number", falls back to `stated_number` when the response holds no box at all. The
synthetic task's verifier reads `stated_number` (its responses end in "Answer: N").

A gold answer the verifier cannot read is never scored as the model's mistake: its verdict is
`bad_gold` (reward 0), counted and reported by the reward stage.

Both verifiers never raise on garbage, empty or enormous text and bound their time per item.
math-verify's own timeouts use `signal.alarm`, which raises outside the main thread (Prefect runs tasks
in threads), so `MathVerifier` runs math-verify with its timeouts off inside a small process pool and
enforces its own per-item deadline, replacing a worker that overruns.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import multiprocessing as mp
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol

Verdict = Literal["correct", "wrong", "no_answer", "bad_gold", "timeout", "error"]
MathAnswerMode = Literal["boxed", "boxed_or_last_number"]
MATH_ANSWER_MODES = ("boxed", "boxed_or_last_number")

# Long reasoning ends with its answer; only the tail is parsed so 1 MB of text costs no more than 8 kB.
MAX_TAIL_CHARS = 8192


@dataclass(frozen=True)
class Judgement:
    reward: float
    verdict: Verdict
    extracted: str | None


class Verifier(Protocol):
    def judge_batch(self, responses: list[str], golds: list[str]) -> list[Judgement]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------ final answers
_BOX = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])(?:\s*\[[^\]\n]*\])*")  # \framebox[w][pos]{..}
# a response cut off inside the name of its last box command: "... \boxed{5}. So it is \box"
_CUT_BOX_NAME = re.compile(r"\\(?:boxe?|fbo?|frameb|framebo|framebox\s*\[[^\]]*)$")


def last_box(text: str) -> tuple[bool, str | None]:
    """(whether `text` holds a box at all, the content of its last box or None when that box is
    unterminated or the text ends inside a box command's name, "\\boxe"). `\\boxed{a{b}c}` -> "a{b}c",
    `\\fbox{42}` and `\\framebox[2cm]{42}` -> "42", `\\boxed 42.` -> "42",
    `\\boxed{\\{1\\}}` -> "\\{1\\}" (escaped braces do not nest); `\\boxed{7` and `\\boxed{}` -> None."""
    if _CUT_BOX_NAME.search(text):
        return True, None
    openers = list(_BOX.finditer(text))
    if not openers:
        return False, None
    pos = openers[-1].end()
    start = pos
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos == len(text):
        return True, None
    if text[pos] != "{":
        if pos == start:  # "\boxed" glued to something that is no argument, e.g. "\boxed$"
            return True, None
        token = re.match(r"[^\s$]+", text[pos:])
        content = token.group(0).rstrip(".,;:") if token else ""
        return True, content or None
    depth, i = 0, pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = text[pos + 1 : i]
                return True, content if content.strip() else None  # an empty box states nothing
        i += 1
    return True, None


def final_box(text: str) -> str | None:
    """The content of the last complete box of `text`; None when there is no box or the last one is
    unterminated (see `last_box`)."""
    return last_box(text)[1]


_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d{1,64})(?:\.\d{1,64})?(?:/\d{1,64})?"
_SINGLE_NUMBER = re.compile(
    rf"\s*(?:\*\*)?\s*(?:\$|\\\()?\s*({_NUMBER})\s*(?:\$|\\\))?\s*(?:\*\*)?\s*\.?\s*(?:\*\*)?\s*"
)
_ANSWER_PHRASE = re.compile(r"\banswer\b\**\s*(?:is\b\s*:?|:|=)", re.IGNORECASE)


def stated_number(text: str) -> str | None:
    """The single number `text` states as its answer, or None (rule in the module docstring).
    "so the answer is 6." -> "6"; "Answer: 3 ... no, Answer: 24" -> "24"; "x8#@ 12 zz" -> None;
    "I think 3, 4, 5 or 6" -> None; "The answer is 3 or 6" -> None; "...\\n$42$" -> "42"."""
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        rest = text[phrases[-1].end() :].split("\n", 1)[0]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return None
        rest = lines[-1]
    match = _SINGLE_NUMBER.fullmatch(rest)
    return match.group(1) if match else None


def number_value(text: str) -> Fraction | None:
    """The exact value of one number written as `stated_number` accepts it ("1,000", "2.50", "-3/4");
    None for anything else."""
    if not re.fullmatch(_NUMBER, text.strip()):
        return None
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str, mode: MathAnswerMode = "boxed") -> str | None:
    """A math response's final answer: the last complete box; with "boxed_or_last_number", the
    `stated_number` of a response that holds no box at all (an unterminated last box is no answer)."""
    has_box, content = last_box(text)
    if has_box or mode == "boxed":
        return content
    if mode == "boxed_or_last_number":
        return stated_number(text)
    raise ValueError(f"unknown math answer mode {mode!r} (expected one of {MATH_ANSWER_MODES})")


# ------------------------------------------------------------------------------ verifiers
class SyntheticVerifier:
    """The embedded task: the `stated_number` of the response (its last 'Answer: N') must equal the
    gold value; a gold that is not one number is `bad_gold`."""

    def judge(self, response: str, gold: str) -> Judgement:
        if not isinstance(response, str):
            return Judgement(0.0, "error", None)
        extracted = stated_number(response[-MAX_TAIL_CHARS:])
        want = number_value(str(gold))
        if want is None:
            return Judgement(0.0, "bad_gold", extracted)
        if extracted is None:
            return Judgement(0.0, "no_answer", None)
        right = number_value(extracted) == want
        return Judgement(1.0 if right else 0.0, "correct" if right else "wrong", extracted)

    def judge_batch(self, responses: list[str], golds: list[str]) -> list[Judgement]:
        return [self.judge(r, g) for r, g in zip(responses, golds, strict=True)]

    def close(self) -> None:
        """Nothing to release (the math verifier holds a process pool)."""


def _import_math_verify() -> None:
    """Import math-verify (a slow import: sympy), once per worker, and silence its warning that its
    own timeouts are off: they are off on purpose, the verifier enforces its own deadline per item
    (MathVerifier.timeout_s), and the warning is printed once per worker process, between the
    iteration lines."""
    import math_verify  # noqa: F401

    logging.getLogger("math_verify").setLevel(logging.ERROR)


def parse_math(text: str) -> list:
    """math-verify's reading of one answer expression (a gold, or a response's extracted answer),
    trying in order `\\boxed{text}`, `$text$` and the bare text (a gold that holds its own box is
    read from that box); the first reading that yields a math object wins. [] when none does
    (e.g. "" or "???"). A bare parse comes last because it reads parts: "(3, \\frac{\\pi}{2})" -> 3."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    _import_math_verify()  # quiet in this process too (parse_math also runs outside the workers)
    text = text.strip()
    if _BOX.search(text):
        text = (final_box(text) or "").strip()
    if not text:
        return []
    attempts = [
        (f"\\boxed{{{text}}}", [LatexExtractionConfig()]),
        (f"${text}$", [LatexExtractionConfig(), ExprExtractionConfig()]),
        (text, [LatexExtractionConfig(), ExprExtractionConfig()]),
    ]
    for wrapped, config in attempts:
        try:
            parsed = parse(wrapped, extraction_config=config, parsing_timeout=None)
        except Exception:  # noqa: BLE001 - one failed reading: try the next
            continue
        if any(not isinstance(p, str) for p in parsed):
            return parsed
    return []


def _math_verify_one(response: str, gold: str, answer_mode: MathAnswerMode = "boxed") -> tuple[float, str, str | None]:
    """Runs in a worker process: math-verify with its signal-based timeouts switched off."""
    from math_verify import verify

    try:
        answer = final_answer(response, answer_mode)
        gold_parsed = parse_math(gold)
        if not gold_parsed:
            return 0.0, "bad_gold", answer
        if answer is None:
            return 0.0, "no_answer", None
        pred = parse_math(answer)
        ok = bool(pred) and bool(verify(gold_parsed, pred, timeout_seconds=None))  # gold first
    except Exception:  # noqa: BLE001 - garbage in must not crash the reward stage
        return 0.0, "error", None
    return (1.0, "correct", answer) if ok else (0.0, "wrong", answer)


class MathVerifier:
    """math-verify on the final answer (`final_answer`, gold first), with a per-item deadline in seconds.

    `answer_mode` is data.math_answer; `judge_fn` (a picklable (response, gold) -> (reward, verdict,
    extracted)) replaces the math-verify judge, e.g. in tests."""

    def __init__(
        self, timeout_s: float = 5.0, workers: int = 2, judge_fn=None, answer_mode: MathAnswerMode = "boxed"
    ) -> None:
        if answer_mode not in MATH_ANSWER_MODES:
            raise ValueError(f"unknown math answer mode {answer_mode!r} (expected one of {MATH_ANSWER_MODES})")
        self.timeout_s = timeout_s
        self.workers = workers
        self.judge_fn = judge_fn or functools.partial(_math_verify_one, answer_mode=answer_mode)
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("spawn"), initializer=_import_math_verify
            )
            # start the workers (and their sympy import) before any item's deadline starts counting
            for fut in [self._pool.submit(_import_math_verify) for _ in range(self.workers)]:
                fut.result()
        return self._pool

    def _reset_pool(self) -> None:
        if self._pool is not None:
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.kill()  # a worker stuck in sympy never returns on its own
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        self._reset_pool()

    def judge_batch(self, responses: list[str], golds: list[str]) -> list[Judgement]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        out: list[Judgement | None] = [None] * len(responses)
        pending = list(range(len(responses)))
        while pending:
            pool = self._get_pool()
            futures = {}
            for i in pending:
                text = responses[i] if isinstance(responses[i], str) else ""
                futures[i] = pool.submit(self.judge_fn, text[-MAX_TAIL_CHARS:], str(golds[i]))
            pending = []
            broken = False
            for i, fut in futures.items():
                if broken:  # the pool was torn down: redo the rest in a fresh one
                    pending.append(i)
                    continue
                try:
                    reward, verdict, extracted = fut.result(timeout=self.timeout_s)
                    out[i] = Judgement(reward, verdict, extracted)  # type: ignore[arg-type]
                except cf.TimeoutError:
                    out[i] = Judgement(0.0, "timeout", None)
                    self._reset_pool()
                    broken = True
                except Exception:  # noqa: BLE001 - a crashed worker is this item's error
                    out[i] = Judgement(0.0, "error", None)
                    self._reset_pool()
                    broken = True
        return out  # type: ignore[return-value]


def make_verifier(kind: str, math_answer: MathAnswerMode = "boxed") -> Verifier:
    """The verifier of data.verifier; `math_answer` (data.math_answer) applies to the math verifier."""
    if kind == "synthetic":
        return SyntheticVerifier()
    if kind == "math":
        return MathVerifier(answer_mode=math_answer)
    raise ValueError(f"unknown verifier '{kind}' (expected 'synthetic' or 'math')")
