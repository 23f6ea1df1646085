"""Held-out evaluation: sample n responses per prompt, verify them, report avg@n, pass@k and entropy."""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass

import pyarrow as pa

from aepo_core.io.engines.base import RolloutEngine, SamplingRequest
from aepo_core.io.verifiers import Verifier


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable running product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n, with n itself always included."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


@dataclass(frozen=True)
class EvalSettings:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


def evaluate(
    engine: RolloutEngine,
    prompt_ids: list[list[int]],
    table: pa.Table,
    verifier: Verifier,
    settings: EvalSettings,
) -> tuple[pa.Table, dict[str, float]]:
    """Sample `settings.n` responses for each row of `table` (id, prompt, answer, source).

    Returns one row per response (prompt id, sample, text, reward, verdict, extracted, tokens, nll) and
    metrics: accuracy (avg@n), pass_at_K for K = 1, 2, 4 … n, entropy_nll (mean -log p of the sampled
    tokens at the sampling temperature), mean response length, truncation rate, tokens/s — plus the
    settings, so every number says how it was measured. With more than one source in the table, also
    `<source>/accuracy`, `<source>/pass_at_K` and `<source>/num_prompts` per source, <source> being
    its `source_metric_names` part (one-to-one; `write_source_names` records the mapping). `bad_gold`
    counts responses whose gold the verifier cannot read.
    """
    requests = [
        SamplingRequest(ids, n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                        max_new_tokens=settings.max_new_tokens)
        for ids in prompt_ids
    ]
    started = time.perf_counter()
    completions = engine.generate(requests, seed=settings.seed)
    seconds = time.perf_counter() - started
    answers = table.column("answer").to_pylist()
    judgements = verifier.judge_batch([c.text for c in completions], [answers[c.request_index] for c in completions])
    ids = table.column("id").to_pylist()
    sources = table.column("source").to_pylist()
    records = pa.table(
        {
            "prompt_id": [ids[c.request_index] for c in completions],
            "source": [sources[c.request_index] for c in completions],
            "sample": [c.sample_index for c in completions],
            "text": [c.text for c in completions],
            "reward": [j.reward for j in judgements],
            "verdict": [j.verdict for j in judgements],
            "extracted": [j.extracted for j in judgements],
            "num_tokens": [len(c.token_ids) for c in completions],
            "nll": [-sum(c.logprobs) for c in completions],
            "finish_reason": [c.finish_reason for c in completions],
        }
    )
    correct = [0] * len(requests)
    for c, j in zip(completions, judgements, strict=True):
        correct[c.request_index] += int(j.reward > 0)
    tokens = sum(len(c.token_ids) for c in completions)
    metrics = {
        **accuracy_and_pass_at_k(correct, settings.n),
        "entropy_nll": sum(-sum(c.logprobs) for c in completions) / max(1, tokens),
        "response_tokens_mean": tokens / max(1, len(completions)),
        "truncated_fraction": sum(c.finish_reason == "length" for c in completions) / max(1, len(completions)),
        "bad_gold": float(sum(j.verdict == "bad_gold" for j in judgements)),
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "generate_seconds": seconds,
        "num_prompts": float(len(requests)),
        "n": float(settings.n),
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_new_tokens": float(settings.max_new_tokens),
    }
    by_source: dict[str, list[int]] = {}
    for request_index, count in enumerate(correct):
        by_source.setdefault(sources[request_index], []).append(count)
    if len(by_source) > 1:  # one source: the overall numbers already are its numbers
        names = source_metric_names(by_source)  # one-to-one; written next to the evaluation (sources.json)
        for source, counts in sorted(by_source.items()):
            name = names[source]
            metrics[f"{name}/num_prompts"] = float(len(counts))
            for key, value in accuracy_and_pass_at_k(counts, settings.n).items():
                metrics[f"{name}/{key}"] = value
    return records, metrics


def accuracy_and_pass_at_k(correct: list[int], n: int) -> dict[str, float]:
    """avg@n ("accuracy") and pass_at_K for K = 1, 2, 4 … n, from the correct counts of each prompt
    (each out of n samples); 0 for no prompts. With 0/1 rewards avg@n equals pass_at_1."""
    prompts = max(1, len(correct))
    metrics = {"accuracy": sum(correct) / (n * prompts)}
    for k in ks_up_to(n):
        metrics[f"pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / prompts
    return metrics


# What MLflow's validate_param_and_metric_name accepts on every system (mlflow/utils/validation.py:
# r"^[/\w.\- ]*$", \w being Unicode word characters), less "/": a source is one part of a metric name.
_UNSAFE = re.compile(r"[^\w.\- ]")
_MAX_PART = 160  # MLflow keys hold at most 250 characters: "eval/" + part + "/pass_at_1024" fits


def metric_safe(name: str) -> str:
    """A source name as an MLflow-safe metric name part: Unicode letters and digits, _ - . and spaces
    kept, anything else "_"; a part made only of dots (a path MLflow refuses) or nothing becomes "_".
    Not one-to-one on its own: `source_metric_names` makes it so."""
    safe = _UNSAFE.sub("_", name)
    return "_" if not safe.strip(".") else safe


def _short_hash(name: str, length: int = 8) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:length]


def source_metric_names(sources) -> dict[str, str]:
    """A one-to-one map from each distinct source name to its metric name part.

    A source MLflow accepts as it is keeps its name ("代数", "MATH L5"); one that had to change
    (`metric_safe`) and then meets another source's name, or is longer than 160 characters, gets a
    stable suffix: "_" + the first 8 hex digits of the sha256 of the source's own text
    ("MATH (L5)" and "MATH [L5]" -> "MATH _L5__<hash>" twice, with different hashes). The result
    depends only on the set of sources."""
    unique = sorted(set(sources))
    safe = {s: metric_safe(s) for s in unique}
    taken: dict[str, int] = {}
    for name in safe.values():
        taken[name] = taken.get(name, 0) + 1
    names: dict[str, str] = {}
    for s in unique:
        name = safe[s]
        if len(name) > _MAX_PART or (name != s and taken[name] > 1):
            name = f"{name[:_MAX_PART]}_{_short_hash(s)}"
        names[s] = name
    if len(set(names.values())) != len(names):  # e.g. a source literally named like another's suffixed name
        names = {s: (n if n == s else f"{safe[s][:_MAX_PART]}_{_short_hash(s, 16)}") for s, n in names.items()}
    if len(set(names.values())) != len(names):
        raise ValueError(f"source names map to clashing metric names: {sorted(names)}")
    return names


def write_source_names(records: pa.Table, folder) -> None:
    """`sources.json` in `folder`: {source name: metric name part} of an evaluation's records, the
    key to the per-source metrics (`<part>/accuracy`, ...) next to the evaluation itself."""
    import json
    from pathlib import Path

    names = source_metric_names(records.column("source").to_pylist())
    (Path(folder) / "sources.json").write_text(json.dumps(names, indent=2, ensure_ascii=False, sort_keys=True))


def settings_from_config(cfg) -> EvalSettings:
    ev = cfg.evaluation
    return EvalSettings(
        n=1 if ev.greedy else ev.n,
        temperature=0.0 if ev.greedy else ev.temperature,
        top_p=ev.top_p,
        max_new_tokens=ev.max_new_tokens or cfg.rollout.max_new_tokens,
        seed=ev.seed,
    )


def evaluate_model(
    cfg, model_path, table: pa.Table | None = None, engine: RolloutEngine | None = None
) -> tuple[pa.Table, dict[str, float]]:
    """Evaluate the policy in `model_path` on `table` (default: the held-out split of `cfg`,
    its first evaluation.num_prompts rows) with the configured verifier and settings, on `engine`
    (already holding that policy) or on a new engine of the configured kind."""
    from aepo_core.io.engines import make_engine
    from aepo_core.io.prompts import encode_prompts
    from aepo_core.io.verifiers import make_verifier
    from aepo_core.pipeline.sources import load_prompt_table

    if table is None:
        table = load_prompt_table(cfg.data, "eval")
    if cfg.evaluation.num_prompts:
        table = table.slice(0, cfg.evaluation.num_prompts)
    own_engine = engine is None
    engine = make_engine(cfg, model_path) if own_engine else engine
    verifier = make_verifier(cfg.data.verifier, cfg.data.math_answer)
    try:
        prompt_ids = encode_prompts(engine.tokenizer, table.column("prompt").to_pylist(), cfg.data.prompt_suffix)
        return evaluate(engine, prompt_ids, table, verifier, settings_from_config(cfg))
    finally:
        if own_engine:
            engine.close()
        verifier.close()


def write_evaluation(cfg, model_path, output) -> dict[str, float]:
    """evaluate_model, then eval.parquet + metrics.json + sources.json published atomically into `output`."""
    import json

    import pyarrow.parquet as pq

    from aepo_core.atomic import atomic_dir

    records, metrics = evaluate_model(cfg, model_path)
    with atomic_dir(output) as tmp:
        pq.write_table(records, tmp / "eval.parquet")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
        write_source_names(records, tmp)
    return metrics
