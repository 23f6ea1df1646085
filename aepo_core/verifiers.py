"""Reward verifiers: response text + gold answer -> 0/1 reward, verdict and the extracted answer.

Both verifiers never raise on garbage, empty or enormous text and bound their time per item.
math-verify's own timeouts use `signal.alarm`, which raises outside the main thread (Prefect runs tasks
in threads), so `MathVerifier` runs math-verify with its timeouts off inside a small process pool and
enforces its own per-item deadline, replacing a worker that overruns.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
from dataclasses import dataclass
from typing import Literal, Protocol

Verdict = Literal["correct", "wrong", "no_answer", "timeout", "error"]

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


_ANSWER = re.compile(r"Answer:\s*(-?\d{1,18})(?!\d)")


class SyntheticVerifier:
    """The embedded task: the last 'Answer: N' in the response must equal the gold value as an integer."""

    def judge(self, response: str, gold: str) -> Judgement:
        if not isinstance(response, str):
            return Judgement(0.0, "error", None)
        matches = _ANSWER.findall(response[-MAX_TAIL_CHARS:])
        if not matches:
            return Judgement(0.0, "no_answer", None)
        extracted = matches[-1]
        try:
            right = int(extracted) == int(str(gold).strip())
        except ValueError:
            return Judgement(0.0, "error", extracted)
        return Judgement(1.0 if right else 0.0, "correct" if right else "wrong", extracted)

    def judge_batch(self, responses: list[str], golds: list[str]) -> list[Judgement]:
        return [self.judge(r, g) for r, g in zip(responses, golds, strict=True)]

    def close(self) -> None:
        """Nothing to release (the math verifier holds a process pool)."""


def _import_math_verify() -> None:
    import math_verify  # noqa: F401 - a slow import (sympy), done once per worker


def _math_verify_one(response: str, gold: str) -> tuple[float, str, str | None]:
    """Runs in a worker process: math-verify with its signal-based timeouts switched off."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    try:
        gold_parsed = parse(
            gold if "\\boxed" in gold or "$" in gold else f"${gold}$",
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=None,
        )
        pred = parse(
            response,
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
            parsing_timeout=None,
        )
    except Exception:  # noqa: BLE001 - garbage in must not crash the reward stage
        return 0.0, "error", None
    if not pred:
        return 0.0, "no_answer", None
    extracted = str(pred[-1]) if len(pred) < 2 else str(pred[1])
    try:
        ok = bool(verify(gold_parsed, pred, timeout_seconds=None))  # gold first
    except Exception:  # noqa: BLE001
        return 0.0, "error", extracted
    return (1.0, "correct", extracted) if ok else (0.0, "wrong", extracted)


class MathVerifier:
    """math-verify on `\\boxed{}` answers (gold first), with a per-item deadline in seconds."""

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, judge_fn=_math_verify_one) -> None:
        self.timeout_s = timeout_s
        self.workers = workers
        self.judge_fn = judge_fn  # a picklable (response, gold) -> (reward, verdict, extracted)
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


def make_verifier(kind: str) -> Verifier:
    if kind == "synthetic":
        return SyntheticVerifier()
    if kind == "math":
        return MathVerifier()
    raise ValueError(f"unknown verifier '{kind}' (expected 'synthetic' or 'math')")
