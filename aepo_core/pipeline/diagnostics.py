"""What each part of the update does to the policy's entropy, to first order (`aepo entropy-push`).

    report = entropy_push(cfg, policy_path, prompt_table, PushSettings(repeats=4))
    print(format_report(report))

The entropy functional. H_probe(theta) is the token mean, over the response tokens of a PROBE set of
responses sampled from the policy at T = 1, of the exact full-vocabulary entropy of softmax(logits)
at T = 1 -- the quantity the update reports as ``entropy/exact_policy_rows``. The probe's tokens
(prompts and sampled responses) are held fixed while theta moves: that is the approximation. A real
step also changes which prefixes the policy samples; this first-order figure leaves that out.

The push of one part. For a part p of the update whose loss has gradient g_p (computed by the
update's own :func:`aepo_core.core.update.update_step`, so advantages, the temperature rule, the
loss at ratio 1 and the normaliser are the update's), one plain gradient step theta - eta * g_p
changes the probe entropy by, to first order,

    dH_p = -eta * <grad H_probe(theta), g_p>.

The parts:

- ``grpo``: the GRPO policy gradient -- ``prompts`` x n rows sampled at rollout.temperature, group
  advantages (algorithm.advantage_scaling), PPO's loss at ratio 1 (= the plain policy gradient),
  scored at rollout.temperature, the configured loss normaliser over the batch (one mini-batch);
- ``reinforce-pos@T``: AEPO's regulariser -- a batch of ``prompts`` x n rows sampled at T, group
  advantages A_T within its own groups, the rows with A_T > algorithm.positive_threshold, each token
  advantage +1, scored at T = 1 (:func:`aepo_core.core.update.scoring_temperatures`), normalised
  over the positives' own tokens (a token mean over them);
- ``reinforce-all@T``: the same on every row of that batch (reward-agnostic tempered REINFORCE).

Per part, over R independent repeats (each with fresh samples for every part AND a fresh probe set,
so the standard error covers both): dH per unit eta (the mean over repeats) and its standard error
(std / sqrt(R)), also times trainer.lr; the rows, tokens and positives used. For the regulariser
parts also "as in the update": the push of the k = min(K, expected |POS|) REINFORCE rows the update
would use (K = algorithm.reinforce_sample_num, |POS| expected from this repeat's positive rate in a
regulariser batch of ceil(reg_prompt_fraction * prompts_per_batch) * rollout.n rows; halving above
the target not applied), weighted as the update weighs them -- ``combine: replace``: their loss sum
over the normaliser of the whole batch of prompts_per_batch * rollout.n rows (k of them REINFORCE
rows); ``add``: alpha times their own token mean -- and its ratio to GRPO's push.

What it leaves out: the step is a plain gradient step (the update's AdamW rescales each coordinate,
and grad-norm clipping is not applied), gradients are computed in float32 whatever trainer.dtype,
and only one mini-batch (exactly on-policy) is considered.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from aepo_core.config import Config, load_config
from aepo_core.core.advantages import group_advantages
from aepo_core.core.aepo import ControllerState, select_positive_samples
from aepo_core.core.algorithms import Decision
from aepo_core.core.batch import SequenceBatch
from aepo_core.core.entropy import shifted_logprobs_and_entropy
from aepo_core.core.losses import loss_normaliser, loss_sum
from aepo_core.core.update import split_micro, update_step
from aepo_core.errors import UserError
from aepo_core.io.engines import SamplingRequest, make_engine
from aepo_core.io.models import load_policy, load_tokenizer, resolve_device
from aepo_core.io.prompts import encode_prompts
from aepo_core.io.verifiers import make_verifier

DEFAULT_TEMPERATURES = (0.8, 1.0, 1.2, 1.5, 2.0)
_ALL_ROWS = 10**9  # "no cap": every positive becomes a REINFORCE row


class PolicyNotFound(UserError):
    """The policy to diagnose (a run's iteration, a model folder) does not exist."""


@dataclass(frozen=True)
class PushSettings:
    """Sizes of the measurement. n None: rollout.n; micro_batch_size None: trainer.micro_batch_size."""

    prompts: int = 16
    n: int | None = None
    probe: int = 64
    repeats: int = 4
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    seed: int = 0
    micro_batch_size: int | None = None

    def check(self) -> None:
        if self.prompts < 1 or self.probe < 1 or self.repeats < 1:
            raise UserError("--prompts, --probe and --repeats must be >= 1")
        if self.n is not None and self.n < 2:
            raise UserError("--n must be >= 2 (a group of one has no advantage)")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise UserError(f"--temperatures must be > 0, got {list(self.temperatures)}")


# ------------------------------------------------------------------------------------- gradients
class _GradientCapture:
    """Stands in for the optimiser in :func:`update_step`: ``step`` keeps the accumulated gradient
    and moves nothing, so the gradient is exactly the one the update would step along."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.grads: list[Tensor] | None = None
        self.steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.steps += 1
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]


def trainable(policy) -> list[Tensor]:
    """The parameters the update trains, in the update's order."""
    return [p for p in policy.parameters() if p.requires_grad]


def _one_step_trainer(cfg: Config, micro_batch_size: int | None):
    # one exactly on-policy mini-batch, no clipping of the gradient (clip_grad_norm_ with an infinite
    # bound scales by 1), float32 for a clean dot product
    return cfg.trainer.model_copy(update={
        "mini_batches": 1, "micro_batch_size": micro_batch_size or cfg.trainer.micro_batch_size,
        "grad_clip": math.inf, "dtype": "float32", "gradient_checkpointing": False,
    })


def update_gradient(policy, policy_batch, regulariser_batch, algorithm_cfg, trainer_cfg, decision, group_size):
    """The gradient of one update step's loss (:func:`update_step` with the optimiser replaced).

    Returns (one tensor per trainable parameter, the step's metrics). Raises RuntimeError when the
    gradient is not finite (the update would skip the step).
    """
    capture = _GradientCapture(trainable(policy))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty policy batch's nan advantage statistics
        result = update_step(policy, capture, policy_batch, regulariser_batch, algorithm_cfg, trainer_cfg,
                             decision, group_size=group_size)
    if capture.grads is None:
        raise RuntimeError("the loss gradient is not finite (the update would skip this step)")
    return capture.grads, result.metrics


def grpo_gradient(policy, batch: SequenceBatch, cfg: Config, trainer_cfg, group_size: int):
    """The GRPO part: group advantages of ``batch`` (rows sampled at rollout.temperature), PPO's
    loss at ratio 1, the configured normaliser; no KL, no bonus, no regulariser rows."""
    algo = cfg.algorithm.model_copy(update={"name": "grpo", "kl_coef": 0.0})
    decision = Decision(temperature=None, k_cap=0, halve_k=False, state=ControllerState())
    return update_gradient(policy, batch, None, algo, trainer_cfg, decision, group_size)


def reinforce_gradient(policy, regulariser: SequenceBatch, cfg: Config, trainer_cfg, group_size: int,
                       positives_only: bool = True):
    """AEPO's REINFORCE part on ``regulariser`` (rows sampled at one temperature, groups of
    group_size): the positives (A_T > positive_threshold; every row with ``positives_only`` False),
    advantage +1 per token, scored at T = 1, a token mean over their own tokens (the update's
    ``combine: add`` with alpha 1, every positive used).

    Returns (gradient, metrics, indices of the rows used). The gradient is None when no row is used.
    """
    threshold = cfg.algorithm.positive_threshold if positives_only else -math.inf
    algo = cfg.algorithm.model_copy(update={
        "name": "aepo", "combine": "add", "alpha": 1.0, "reinforce_sample_num": _ALL_ROWS,
        "halve_above_target": False, "kl_coef": 0.0, "positive_threshold": threshold,
        "regulariser_samples": "positives",  # "all rows" is the threshold -inf above, not this option
    })
    used = select_positive_samples(
        group_advantages(regulariser.rewards, group_size, cfg.algorithm.advantage_scaling), threshold
    )
    if len(used) == 0:
        return None, {}, used
    temperature = float(regulariser.temperatures[0])
    decision = Decision(temperature=temperature, k_cap=_ALL_ROWS, halve_k=False, state=ControllerState())
    empty = SequenceBatch.from_token_lists([], [], regulariser.pad_id)
    grads, metrics = update_gradient(policy, empty, regulariser, algo, trainer_cfg, decision, group_size)
    if int(metrics.get("aepo/k", -1)) != len(used):
        raise RuntimeError(f"the update used {metrics.get('aepo/k')} REINFORCE rows, expected {len(used)}")
    return grads, metrics, used


@torch.enable_grad()
def probe_entropy_gradient(policy, probe: SequenceBatch, chunk: int = 1024, micro_batch_size: int | None = None):
    """H_probe and its gradient: the token mean over ``probe``'s response tokens of the exact
    entropy at T = 1, its tokens held fixed. Returns (value, one tensor per trainable parameter)."""
    params = trainable(policy)
    batch = probe.to(params[0].device)
    total = loss_normaliser(batch.response_mask, "token_mean")
    for p in params:
        p.grad = None
    was_training = policy.training
    policy.eval()
    value = 0.0
    try:
        for rows in split_micro(range(len(batch)), micro_batch_size):
            mb = batch.select(list(rows)).trimmed()
            logits = policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
            _, entropy = shifted_logprobs_and_entropy(logits, mb.input_ids, chunk, True, True)
            part = loss_sum(entropy, mb.response_mask, "token_mean") / total
            part.backward()
            value += part.item()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    finally:
        for p in params:
            p.grad = None
        policy.train(was_training)
    return value, grads


def first_order_change(entropy_grad: list[Tensor], loss_grad: list[Tensor]) -> float:
    """dH per unit step size of the step theta - eta * g: -<grad H, g>, summed over parameters."""
    return -float(sum((a.double() * b.double()).sum() for a, b in zip(entropy_grad, loss_grad, strict=True)))


# ------------------------------------------------------------------------------------- the update's weighting
def update_weight(cfg: Config, positives: int, rows: int, positive_norm: float, grpo_norm_per_row: float) -> tuple[float, float]:
    """(k, scale): the REINFORCE rows the update would use and the factor from the measured push
    (a token mean over ``positives`` rows of normaliser ``positive_norm``, out of ``rows`` sampled)
    to their push in the update.

    k = min(K, expected |POS|, the batch's rows when combine is replace), |POS| expected from the
    measured rate in the update's regulariser batch. replace: the k rows' loss sum over the whole
    batch's normaliser, (prompts_per_batch * n - k) GRPO rows of ``grpo_norm_per_row`` each plus k
    REINFORCE rows; add: alpha * their token mean (times min(1, k): with less than one expected
    positive the update mostly has none).
    """
    a, r = cfg.algorithm, cfg.rollout
    if positives == 0 or rows == 0:
        return 0.0, 0.0
    batch_rows = r.prompts_per_batch * r.n
    reg_rows = math.ceil(a.reg_prompt_fraction * r.prompts_per_batch) * r.n
    k = min(float(a.reinforce_sample_num), positives / rows * reg_rows)
    if a.combine == "add":
        return k, float(a.alpha) * min(1.0, k)
    k = min(k, float(batch_rows))
    per_row = positive_norm / positives
    denominator = (batch_rows - k) * grpo_norm_per_row + k * per_row
    return k, (k * per_row / denominator) if denominator > 0 else 0.0


# ------------------------------------------------------------------------------------- the report
@dataclass
class PartResult:
    """One part's measurement; lists hold one value per repeat (nan: the part had no rows then)."""

    name: str
    kind: str  # grpo | reinforce-pos | reinforce-all
    temperature: float
    per_eta: list[float] = field(default_factory=list)
    update_per_eta: list[float] = field(default_factory=list)  # regulariser parts: as in the update
    rows: list[int] = field(default_factory=list)
    used: list[int] = field(default_factory=list)  # rows that carry the gradient (positives)
    tokens: list[int] = field(default_factory=list)
    k: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def mean_se(values: list[float]) -> tuple[float, float, int]:
    """(mean, standard error std/sqrt(m), m) over the finite values; se nan when m < 2."""
    x = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, 0
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(x.mean()), se, len(x)


def ratio_se(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a) / mean(b) over paired repeats, with its delta-method standard error."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if not pairs:
        return math.nan, math.nan
    x, y = np.array(pairs, dtype=np.float64).T
    ma, mb = x.mean(), y.mean()
    if mb == 0:
        return math.nan, math.nan
    ratio = float(ma / mb)
    if len(x) < 2:
        return ratio, math.nan
    m = len(x)
    va, vb, cov = x.var(ddof=1) / m, y.var(ddof=1) / m, np.cov(x, y, ddof=1)[0, 1] / m
    var = (va - 2 * ratio * cov + ratio**2 * vb) / mb**2
    return ratio, float(math.sqrt(max(var, 0.0)))


def summarise(parts: list[PartResult], probe_entropy: list[float], cfg: Config, settings: PushSettings,
              policy: str, seconds: float) -> dict[str, Any]:
    """The report as plain data (what --out writes as JSON)."""
    lr = cfg.trainer.lr
    grpo = next((p for p in parts if p.kind == "grpo"), None)
    rows = []
    for p in parts:
        m, se, valid = mean_se(p.per_eta)
        row: dict[str, Any] = {
            "part": p.name, "kind": p.kind, "temperature": p.temperature,
            "dH_per_eta": m, "dH_per_eta_se": se, "dH_at_lr": m * lr, "dH_at_lr_se": se * lr,
            "repeats_with_rows": valid,
            "rows_mean": float(np.mean(p.rows)), "used_rows_mean": float(np.mean(p.used)),
            "tokens_mean": float(np.mean(p.tokens)),
            "per_repeat": p.per_eta,
        }
        if p.kind != "grpo":
            um, use, _ = mean_se(p.update_per_eta)
            ratio, rse = ratio_se(p.update_per_eta, grpo.per_eta) if grpo else (math.nan, math.nan)
            row.update({
                "accuracy": float(np.mean(p.accuracy)), "k_mean": float(np.mean(p.k)),
                "update_dH_per_eta": um, "update_dH_per_eta_se": use,
                "update_dH_at_lr": um * lr, "update_dH_at_lr_se": use * lr,
                "ratio_to_grpo": ratio, "ratio_to_grpo_se": rse,
                "update_per_repeat": p.update_per_eta,
            })
        else:
            row["accuracy"] = float(np.mean(p.accuracy))
        rows.append(row)
    h, hse, _ = mean_se(probe_entropy)
    a, r = cfg.algorithm, cfg.rollout
    return {
        "policy": policy,
        "settings": {**asdict(settings), "temperatures": list(settings.temperatures)},
        "config": {
            "trainer.lr": lr, "rollout.n": r.n, "rollout.temperature": r.temperature, "rollout.top_p": r.top_p,
            "rollout.prompts_per_batch": r.prompts_per_batch, "rollout.max_new_tokens": r.max_new_tokens,
            "algorithm.reinforce_sample_num": a.reinforce_sample_num,
            "algorithm.positive_threshold": a.positive_threshold,
            "algorithm.advantage_scaling": a.advantage_scaling, "algorithm.reg_prompt_fraction": a.reg_prompt_fraction,
            "algorithm.combine": a.combine, "algorithm.alpha": a.alpha, "algorithm.loss_agg": a.loss_agg,
        },
        "probe_entropy": h, "probe_entropy_se": hse, "probe_entropy_per_repeat": probe_entropy,
        "parts": rows,
        "seconds": seconds,
    }


def _fmt(value: float, digits: int = 4, signed: bool = True) -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    if value == 0:
        return "0"
    return f"{value:+.{digits}g}" if signed else f"{value:.{digits}g}"


def _table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["part", "rows", "used", "tokens", "acc", "dH/eta", "SE", "dH@lr", "k", "update dH@lr", "SE",
            "x GRPO", "SE"]
    body = []
    for p in report["parts"]:
        reg = p["kind"] != "grpo"
        body.append([
            p["part"], f"{p['rows_mean']:.0f}", f"{p['used_rows_mean']:.1f}", f"{p['tokens_mean']:.0f}",
            f"{p['accuracy']:.2f}", _fmt(p["dH_per_eta"]), _fmt(p["dH_per_eta_se"], 2, False), _fmt(p["dH_at_lr"]),
            f"{p['k_mean']:.1f}" if reg else "", _fmt(p["update_dH_at_lr"]) if reg else "",
            _fmt(p["update_dH_at_lr_se"], 2, False) if reg else "",
            _fmt(p["ratio_to_grpo"], 3) if reg else "", _fmt(p["ratio_to_grpo_se"], 2, False) if reg else "",
        ])
    return head, body


def _header_lines(report: dict[str, Any]) -> list[str]:
    c, s = report["config"], report["settings"]
    return [
        f"policy: {report['policy']}",
        f"probe entropy H_probe (exact, T = 1): {report['probe_entropy']:.4f} +- {_fmt(report['probe_entropy_se'], 2, False)} "
        f"nats/token ({s['probe']} responses per repeat, {s['repeats']} repeats)",
        f"per part: {s['prompts']} prompts x n = {s['n'] or c['rollout.n']}; trainer.lr = {c['trainer.lr']:g}; "
        f"as in the update: K = {c['algorithm.reinforce_sample_num']}, combine = {c['algorithm.combine']}, "
        f"batch of {c['rollout.prompts_per_batch']} x {c['rollout.n']} rows",
        "dH/eta: first-order change of H_probe per unit plain-gradient step (-<grad H_probe, g>); "
        "SE over repeats (fresh samples and probe each)",
    ]


def format_report(report: dict[str, Any]) -> str:
    """The plain-text table (columns aligned), headed by the probe entropy and the settings."""
    head, body = _table_rows(report)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = _header_lines(report) + [""]
    for r in [head, *body]:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))))
    lines.append("")
    lines.append("acc: the batch's accuracy (mean reward); used: rows carrying the gradient (positives for "
                 "reinforce-pos); k: REINFORCE rows the update would use; update dH@lr: their push as the "
                 "update weighs them; x GRPO: that push over GRPO's (negative: the opposite direction; meaningless while GRPO's own push is within its SE of 0); nan: no row to train on")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    head, body = _table_rows(report)
    lines = ["# Entropy push", ""] + [f"- {line}" for line in _header_lines(report)] + [""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> list[Path]:
    """entropy_push.json and entropy_push.md in the folder ``out`` (created)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "entropy_push.json", folder / "entropy_push.md"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(format_markdown(report))
    return paths


# ------------------------------------------------------------------------------------- the measurement
def _sequence_batch(prompt_ids, completions, pad_id: int, rewards=None) -> SequenceBatch:
    return SequenceBatch.from_token_lists(
        [prompt_ids[c.request_index] for c in completions], [c.token_ids for c in completions], pad_id,
        rewards=rewards, temperatures=[c.temperature for c in completions],
    )


def measure_entropy_push(cfg: Config, policy_path: str | Path, prompts: pa.Table, settings: PushSettings,
                         log=print) -> dict[str, Any]:
    """Measure every part's first-order entropy push on the policy in ``policy_path``.

    Args:
        cfg: data (verifier, prompt suffix), rollout (n, temperature, top_p, max_new_tokens, engine),
            algorithm and trainer settings (module docstring).
        policy_path: an HF model folder.
        prompts: the normalised prompt table (prompt, answer); prompts are drawn from it at random,
            afresh for every repeat.
        settings: the sizes (:class:`PushSettings`).
    Returns:
        the report (:func:`summarise`): per part the mean dH per unit eta over repeats, its SE, ...
    """
    settings.check()
    started = time.perf_counter()
    n = settings.n or cfg.rollout.n
    r = cfg.rollout
    device = resolve_device(cfg.trainer)
    policy = load_policy(policy_path, device=device, dtype="float32", trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(policy_path, cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    engine = make_engine(cfg, policy_path)
    verifier = make_verifier(cfg.data.verifier, cfg.data.math_answer)
    trainer_cfg = _one_step_trainer(cfg, settings.micro_batch_size)
    texts, answers = prompts.column("prompt").to_pylist(), prompts.column("answer").to_pylist()
    if not texts:
        raise UserError("the prompt table is empty")
    temps = list(settings.temperatures)
    parts = [PartResult("grpo", "grpo", float(r.temperature))]
    for t in temps:
        parts += [PartResult(f"reinforce-pos@{t:g}", "reinforce-pos", t), PartResult(f"reinforce-all@{t:g}", "reinforce-all", t)]
    probe_entropy: list[float] = []
    try:
        for rep in range(settings.repeats):
            rng = np.random.default_rng([settings.seed, rep])
            size = len(texts)
            part_idx = rng.choice(size, settings.prompts, replace=settings.prompts > size).tolist()
            probe_idx = rng.choice(size, settings.probe, replace=settings.probe > size).tolist()
            idx = probe_idx + part_idx
            ids = encode_prompts(engine.tokenizer, [texts[i] for i in idx], cfg.data.prompt_suffix)
            probe_ids, part_ids = ids[: settings.probe], ids[settings.probe :]
            # one generate call: the probe (T = 1, top_p 1), the policy rows, one regulariser batch per T
            requests = [SamplingRequest(p, 1, 1.0, 1.0, r.max_new_tokens) for p in probe_ids]
            for t in [r.temperature, *temps]:
                requests += [SamplingRequest(p, n, t, r.top_p, r.max_new_tokens) for p in part_ids]
            completions = engine.generate(requests, seed=int(rng.integers(2**31)))
            golds = [answers[part_idx[(c.request_index - settings.probe) % settings.prompts]]
                     for c in completions[settings.probe :]]
            rewards = [j.reward for j in verifier.judge_batch([c.text for c in completions[settings.probe :]], golds)]
            probe = _sequence_batch(probe_ids, completions[: settings.probe], pad_id)
            h, grad_h = probe_entropy_gradient(policy, probe, cfg.trainer.logits_chunk, trainer_cfg.micro_batch_size)
            probe_entropy.append(h)

            block = settings.prompts * n
            batches = []
            for b in range(len(temps) + 1):
                chunk = completions[settings.probe + b * block : settings.probe + (b + 1) * block]
                prompt_of = [part_ids[(c.request_index - settings.probe) % settings.prompts] for c in chunk]
                batches.append(SequenceBatch.from_token_lists(
                    prompt_of, [c.token_ids for c in chunk], pad_id,
                    rewards=rewards[b * block : (b + 1) * block], temperatures=[c.temperature for c in chunk],
                ))
            agg, const = cfg.algorithm.loss_agg, cfg.algorithm.loss_constant
            policy_batch = batches[0]
            grpo_norm_per_row = loss_normaliser(policy_batch.response_mask, agg, const) / len(policy_batch)
            grads, _ = grpo_gradient(policy, policy_batch, cfg, trainer_cfg, n)
            grpo = parts[0]
            grpo.per_eta.append(first_order_change(grad_h, grads))
            grpo.rows.append(len(policy_batch))
            grpo.used.append(len(policy_batch))
            grpo.tokens.append(int(policy_batch.response_mask.sum()))
            grpo.accuracy.append(float((policy_batch.rewards > 0).float().mean()))
            del grads
            for j, reg in enumerate(batches[1:]):
                for part, only_pos in ((parts[1 + 2 * j], True), (parts[2 + 2 * j], False)):
                    grads, _, used = reinforce_gradient(policy, reg, cfg, trainer_cfg, n, only_pos)
                    used_mask = reg.response_mask[used]
                    value = first_order_change(grad_h, grads) if grads is not None else math.nan
                    norm = loss_normaliser(used_mask, agg, const) if len(used) else 0.0
                    k, scale = update_weight(cfg, len(used), len(reg), norm, grpo_norm_per_row)
                    part.per_eta.append(value)
                    part.update_per_eta.append(value * scale if len(used) else 0.0)
                    part.k.append(k)
                    part.rows.append(len(reg))
                    part.used.append(len(used))
                    part.tokens.append(int(used_mask.sum()))
                    part.accuracy.append(float((reg.rewards > 0).float().mean()))
                    del grads
            if log is not None:
                log(f"repeat {rep + 1}/{settings.repeats}: H_probe {h:.4f}, GRPO dH/eta {grpo.per_eta[-1]:+.4g} "
                    f"({time.perf_counter() - started:.0f} s)")
    finally:
        engine.close()
        verifier.close()
    return summarise(parts, probe_entropy, cfg, settings, str(policy_path), time.perf_counter() - started)


# ------------------------------------------------------------------------------------- which policy
def resolve_target(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
    iteration: int | None = None,
    model: str | Path | None = None,
    log=print,
) -> tuple[Config, Path, pa.Table]:
    """(config, policy folder, train prompt table) of what to diagnose.

    --run-dir X --iteration I: the policy iteration I samples with (the base for 0, else the policy
    iteration I - 1's update wrote), the run's config (overrides on top), its dataset snapshot.
    --model PATH: that HF folder, the given config, its train split. Neither: model.path or the
    embedded base policy. PolicyNotFound (exit 2) names what is missing.
    """
    from aepo_core.pipeline.retention import pruned_need
    from aepo_core.pipeline.rundir import RunDir
    from aepo_core.pipeline.sources import load_prompt_table
    from aepo_core.pipeline.stages import PIPELINE, policy_dir

    if run_dir is not None and model is not None:
        raise UserError("give either --run-dir (with --iteration) or --model, not both")
    if run_dir is None:
        if iteration is not None:
            raise UserError("--iteration needs --run-dir")
        cfg = load_config(config, overrides or [])
        if model is None:
            from aepo_core.pipeline.preflight import resolve_base

            path = resolve_base(cfg, log=log)
        else:
            path = Path(model)
            if not (path / "config.json").is_file():
                raise PolicyNotFound(f"--model {path} is not an HF model folder (no config.json)")
        return cfg, path, load_prompt_table(cfg.data, "train")
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise PolicyNotFound(f"{run.root} is not a run directory (no config.yaml)")
    if iteration is None:
        raise UserError("--run-dir needs --iteration (the iteration whose starting policy to measure)")
    if config is not None:
        raise UserError("--config does not apply to --run-dir (the run's own config is used; overrides do apply)")
    cfg = load_config(run.config_path, overrides or [])
    if iteration < 0:
        raise PolicyNotFound(f"--iteration {iteration}: iterations start at 0")
    if iteration == 0 and run.read_json("base.json") is None:
        raise PolicyNotFound(f"{run.root / 'base.json'} is missing: the run has no starting policy")
    if iteration > 0 and run.manifest(iteration - 1, "update") is None:
        raise PolicyNotFound(
            f"iteration {iteration}'s policy does not exist yet: the update of iteration {iteration - 1} "
            f"has not finished in {run.root}"
        )
    problem = pruned_need(run, iteration, "rollout", PIPELINE["rollout"].needs)  # the policy iteration starts from
    if problem:
        raise PolicyNotFound(problem)
    path = policy_dir(run, iteration)  # the base for 0, else the previous update's policy
    if not (path / "config.json").is_file():
        raise PolicyNotFound(f"the policy of iteration {iteration}, {path}, is not an HF model folder (no config.json)")
    train = run.dataset_path("train")
    if not train.is_file():
        raise PolicyNotFound(f"{train} is missing: the run's dataset snapshot is gone")
    import pyarrow.parquet as pq

    return cfg, path, pq.read_table(train)


def entropy_push(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
    iteration: int | None = None,
    model: str | Path | None = None,
    settings: PushSettings | None = None,
    out: str | Path | None = None,
    log=print,
) -> dict[str, Any]:
    """`aepo entropy-push`: resolve the policy, measure, write ``out`` (JSON + Markdown) if given."""
    settings = settings or PushSettings()
    settings.check()
    cfg, path, table = resolve_target(config, overrides, run_dir, iteration, model, log=log)
    report = measure_entropy_push(cfg, path, table, settings, log=log)
    if out is not None:
        write_report(report, out)
    return report
