"""The update step: one PPO epoch over the assembled batch, for every algorithm of the project.

    result = update_step(policy, optimizer, policy_batch, regulariser_batch, algo_cfg, trainer_cfg,
                         controller, group_size=n)
    controller = result.controller          # persist result.controller.to_dict() with the checkpoint

Order of work (aepo-algorithm.md, steps 4 and 8-13):
  1. GRPO advantages of the policy batch (groups of ``group_size`` consecutive rows).
  2. aepo only: advantages A_T of the regulariser batch in its own groups, POS = A_T > threshold,
     k from the controller state, X = assemble_batch(...) (REINFORCE rows first).
  3. Old log-probs of every row of X at its scoring temperature (no grad), with the same
     mini/micro-batch partition the update uses, so the first mini-batch's ratio is exactly 1; also
     the exact entropy of pi_old (entropy_adv) and the reference log-probs (kl_coef > 0).
  4. X is split IN ORDER into trainer.mini_batches mini-batches (no shuffling), each into
     micro-batches with gradient accumulation, built to trainer.max_tokens_per_micro_batch padded
     tokens from rows sorted by length (and at most trainer.micro_batch_size rows); one optimiser step
     with grad-norm clipping per mini-batch. If the k REINFORCE rows do not fit in the first
     mini-batch, a warning says how many spill into later (off-policy) mini-batches.
  5. Entropy (both estimators, at T = 1) is measured on the update's own forward passes: the mean
     over all response tokens of X; h_prev for the next step is the configured estimator over all
     rows of X. Micro-batches without response tokens are skipped (no forward pass).

Temperature rule (:func:`scoring_temperatures`, the one place): policy rows are scored at the
temperature they were sampled at (log-probs, ratio, clip and KL of softmax(logits / T)); AEPO's
REINFORCE rows at T = 1 (the reference algorithm); every entropy the step reports, and h_prev, at
T = 1.

Loss normaliser (micro-batch invariant): ``algorithm.loss_agg`` is over the whole MINI-batch. Its
normaliser -- token_mean: the mini-batch's response-token count; seq_mean_token_mean: its rows with
tokens; constant: its rows times loss_constant (:func:`aepo_core.core.losses.loss_normaliser`) -- is
counted before the first forward pass, and every micro-batch's loss SUM is divided by it, so the
accumulated gradient is the same for any micro-batch partition (verl issue 5625 fixed the 1 / n_micro
weighting the same way). On N ranks every rank holds the whole batch and counts the same normalisers
(aepo_core.core.ranks: the micro-batches are dealt, the measurements added over ranks). The
metrics are token-weighted over the whole batch (entropy, clip fractions, ratios) or one value per
mini-batch averaged over mini-batches (losses).

Combining the two row kinds (``algorithm.combine``, :func:`aepo_core.core.losses.role_losses`):
  - replace (reference code): GRPO and REINFORCE rows share the mini-batch's normaliser, e.g.
    loss = sum over all response tokens of the mini-batch / their count;
  - add (paper): loss = J_GRPO + alpha * J_REINFORCE, the GRPO rows aggregated over the GRPO rows'
    own tokens and the REINFORCE rows over theirs in the mini-batch (alpha is the REINFORCE rows'
    weight). Metrics: loss/grpo is J_GRPO, loss/reinforce is alpha * J_REINFORCE.

Dropout: old log-probs are computed in eval() (no dropout). The update's forward passes keep the
model in train() -- transformers (5.x) only applies activation checkpointing when the layer's
``self.training`` is True -- but run with every dropout disabled (torch dropout modules set to p = 0
and float ``*dropout*`` attributes such as Qwen2's ``attention_dropout`` set to 0.0, restored
afterwards; see :func:`dropout_disabled`). Both passes then compute the same function, so the first
mini-batch's ratio is exactly 1 even for a model configured with dropout, as in verl/TRL, which also
train RL policies without dropout.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aepo_core.config import AlgorithmConfig, TrainerConfig
from aepo_core.core.aepo import ControllerState
from aepo_core.core.algorithms import Algorithm, Decision, make_algorithm
from aepo_core.core.baselines import entropy_bonus_term, nll_entropy_surrogate
from aepo_core.core.batch import ROLE_REINFORCE, SequenceBatch
from aepo_core.core.entropy import exact_entropy, nll_entropy, shifted_logprobs_and_entropy
from aepo_core.core.lookahead import PROBE, displaced, first_order_ahead, pending_momentum
from aepo_core.core.losses import (
    kl_k3,
    loss_normaliser,
    loss_sum,
    masked_mean,
    policy_loss_diagnostics,
    role_loss_sums,
    role_normalisers,
    rollout_correction_weights,
    rollout_mismatch,
)
from aepo_core.core.ranks import SINGLE, Ranks, deal, gather, micro_batch_rows


@dataclass
class UpdateResult:
    """What one update step returns (the controller's next state is the entropy stage's business).

    metrics: flat name -> float (names contain only letters, digits, '_', '/', '.').
    rows: one record per row of the assembled batch, in batch order: row, mini_batch, role,
        source ("policy" | "regulariser"), source_index, reward, temperature, weight, advantage
        (mean over the row's response tokens of the advantage used), response_tokens.
    """

    metrics: dict[str, float]
    rows: list[dict[str, Any]]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16; Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for trainer.dtype on ``device`` (None: run in the parameters' dtype).

    "auto": bfloat16 on a CUDA device that supports it and on a CPU with native bfloat16
    instructions (2.2x faster update steps on an AVX512-BF16 EPYC, docs/performance.md), else None;
    "bfloat16": bfloat16 on any device; "float32": None.
    """
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------- splitting
def split_in_order(num_rows: int, parts: int) -> list[range]:
    """Consecutive, non-empty row ranges covering 0..num_rows-1, in order, no shuffling.

    Sizes differ by at most one, larger first (torch.tensor_split's rule); fewer than ``parts``
    ranges when num_rows < parts. E.g. split_in_order(10, 4) -> [0:3], [3:6], [6:8], [8:10].
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(num_rows, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        if size:
            out.append(range(start, start + size))
        start += size
    return out


def split_micro(
    rows: range, micro_batch_size: int | None, max_tokens: int | None = None, lengths: Sequence[int] | None = None
) -> list[Sequence[int]]:
    """One mini-batch's rows as micro-batches (each a forward/backward pass with gradient accumulation).

    Args:
        rows: the mini-batch's rows (consecutive).
        micro_batch_size: most rows per micro-batch (None: no cap).
        max_tokens: most padded tokens per micro-batch, rows x its longest row (None: chunks of
            micro_batch_size consecutive rows, the whole mini-batch when that is None too).
        lengths: [B] each row's length in tokens (prompt + response); needed with max_tokens.
    Returns:
        Row index sequences covering ``rows`` once each. With max_tokens the rows are sorted by length
        (ties in row order) and packed greedily, so rows of similar length share a micro-batch and
        little compute goes to padding; a row longer than max_tokens is a micro-batch of its own
        (never dropped). The loss normaliser is the mini-batch's, so the gradient does not depend on
        this partition (module docstring).
    """
    if max_tokens is None:
        size = micro_batch_size or len(rows)
        return [rows[i : i + size] for i in range(0, len(rows), size)] or [rows]
    if lengths is None:
        raise ValueError("split_micro: max_tokens needs the rows' lengths")
    out: list[list[int]] = []
    current: list[int] = []
    for r in sorted(rows, key=lambda r: lengths[r]):
        full = micro_batch_size is not None and len(current) >= micro_batch_size
        if current and (full or (len(current) + 1) * lengths[r] > max_tokens):
            out.append(current)
            current = []
        current.append(r)  # sorted by length: row r is the longest of its micro-batch so far
    return out + [current] if current else out


def _partition(lengths: Sequence[int], trainer_cfg: TrainerConfig, ranks: Ranks = SINGLE) -> list[list[Sequence[int]]]:
    """Mini-batches (consecutive, in order) of micro-batches (:func:`split_micro`) of the batch's rows;
    with N ranks at least N micro-batches per mini-batch of N rows or more (:func:`micro_batch_rows`)."""
    return [
        split_micro(mb, micro_batch_rows(len(mb), trainer_cfg.micro_batch_size, ranks),
                    trainer_cfg.max_tokens_per_micro_batch, lengths)
        for mb in split_in_order(len(lengths), trainer_cfg.mini_batches)
    ]


def _span(micro: list[Sequence[int]]) -> range:
    """The consecutive rows of a mini-batch, from its micro-batches."""
    return range(min(min(rows) for rows in micro), max(max(rows) for rows in micro) + 1)


# ---------------------------------------------------------------------------------------- temperatures
def scoring_temperatures(batch: SequenceBatch) -> Tensor | None:
    """The temperature at which each row's log-probs, ratio and clip are computed: THE rule.

    - policy (GRPO) rows: the temperature they were sampled at (``rollout.temperature``), so the
      update scores exactly the distribution the engine sampled from -- the first on-policy ratio is
      1 and pi_old's log-probs equal the engine's (TRL, verl and OpenRLHF do the same);
    - AEPO REINFORCE rows: T = 1 whatever temperature the controller sampled them at -- the reference
      algorithm's E_{y ~ pi^T}[grad log pi(y)] with pi the policy itself (aepo-algorithm.md);
    - the entropy the controller reads (and every ``entropy/*`` metric) is always at T = 1.

    Args:
        batch: [B] rows with ``temperatures`` and ``roles``.
    Returns:
        [B] float32 temperatures, or None when every row is scored at T = 1 (no rescaling at all).
    Raises:
        ValueError: a policy row sampled at T <= 0 (greedy) has no log-probability to train on.
    """
    is_reinforce = torch.tensor([r == ROLE_REINFORCE for r in batch.roles], dtype=torch.bool)
    temps = torch.where(is_reinforce, torch.ones(len(batch)), batch.temperatures.float().cpu())
    if bool((temps <= 0).any()):
        raise ValueError(
            "policy rows sampled greedily (temperature 0) cannot be trained: set rollout.temperature > 0"
        )
    return None if bool((temps == 1.0).all()) else temps


# ---------------------------------------------------------------------------------------- forward passes
def _forward(policy, mb: SequenceBatch, chunk: int, temps: Tensor | None, with_entropy: bool,
             entropy_grad: bool, t1_grad: bool = False):
    """One forward pass -> (logp at the scoring temperature, logp at T = 1, exact entropy at T = 1).

    All [b, L] float32; the entropy is None unless ``with_entropy``. ``temps`` [b] (None: every row
    at T = 1, and both log-probs are the same tensor). The T = 1 log-probs keep their graph only with
    ``t1_grad`` (the nll entropy bonus needs it).
    """
    logits = policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
    if temps is None:
        logp, entropy = shifted_logprobs_and_entropy(logits, mb.input_ids, chunk, with_entropy, entropy_grad)
        return logp, logp, entropy
    logp_t, _ = shifted_logprobs_and_entropy(logits, mb.input_ids, chunk, False, False, temps)
    with torch.set_grad_enabled(torch.is_grad_enabled() and (t1_grad or entropy_grad)):
        logp_1, entropy = shifted_logprobs_and_entropy(logits, mb.input_ids, chunk, with_entropy, entropy_grad)
    return logp_t, logp_1, entropy


@torch.no_grad()
def compute_logprobs(
    model,
    batch: SequenceBatch,
    partition: list[list[range]],
    chunk: int,
    amp_dtype: torch.dtype | None = None,
    with_entropy: bool = False,
    temperatures: Tensor | None = None,
    ranks: Ranks = SINGLE,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and exact entropy) of every row, without grad, micro-batch by micro-batch.

    Args:
        model: HF causal LM.
        batch: [B, L] on the model's device.
        partition: mini-batches of micro-batches of row indices (use the update's partition so the
            numerics of the first mini-batch match the update exactly).
        chunk: sequence chunk for the log-softmax.
        amp_dtype: autocast dtype or None.
        with_entropy: also return the per-token exact entropy (at T = 1).
        temperatures: [B] scoring temperature per row (:func:`scoring_temperatures`); None: T = 1.
        ranks: with N ranks each computes its share of the micro-batches (:func:`deal`, every
            micro-batch counted) and the shares are summed, so every rank returns every row.
    Returns:
        (logp [B, L] float32, entropy [B, L] float32 or None); zeros beyond each micro-batch's
        trimmed length (padding).
    """
    device = batch.input_ids.device
    logp = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=device)
    ent = torch.zeros_like(logp) if with_entropy else None
    was_training = model.training
    model.eval()
    try:
        for micro in partition:
            for rows, counts in deal(micro, [True] * len(micro), ranks):
                idx = torch.as_tensor(list(rows), dtype=torch.long, device=device)
                mb = batch.select(idx).trimmed()
                temps = temperatures[idx] if temperatures is not None else None
                with _autocast(device, amp_dtype):
                    lp, _, h = _forward(model, mb, chunk, temps, with_entropy, entropy_grad=False)
                if not counts:  # a padding pass: its forward keeps the ranks' collectives in step
                    continue
                logp[idx, : mb.seq_len] = lp.float()
                if with_entropy:
                    ent[idx, : mb.seq_len] = h.float()
    finally:
        model.train(was_training)
    if ranks.world > 1:  # each row was filled by exactly one rank, zeros elsewhere
        for part in (logp, ent) if with_entropy else (logp,):
            torch.distributed.all_reduce(part)
    return logp, ent


class _TokenMeans:
    """Token-weighted means over everything a step measured: sum(value * tokens) / sum(tokens).

    Each micro-batch adds (its mean, its token count), so the result is the mean over all tokens
    whatever the micro-batch partition; on N ranks the pairs are added over ranks (:func:`_merge_ranks`).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, key: str, mean: float, count: float) -> None:
        if count > 0:
            self.sums[key] += mean * count
            self.counts[key] += count

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}


@contextlib.contextmanager
def dropout_disabled(model):
    """Run ``model`` with every dropout off, whatever its train()/eval() mode; restored on exit.

    Sets ``p = 0`` on torch dropout modules and 0.0 on float module attributes whose name contains
    "dropout" (transformers attention modules pass e.g. ``self.attention_dropout`` to the attention
    function when ``self.training``). The model can stay in train() so that activation
    checkpointing, which transformers gates on ``self.training``, stays active.
    """
    saved: list[tuple[Any, str, float]] = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            saved.append((module, "p", module.p))
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if "dropout" in name.lower() and isinstance(value, float) and not isinstance(value, bool):
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def is_checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers >= 5 renamed the attribute."""
    if hasattr(model, "get_base_model"):  # a peft wrapper (LoRA): the transformers model inside decides
        model = model.get_base_model()
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _enable_checkpointing(policy) -> None:
    if is_checkpointing(policy):
        return
    kwargs = {"use_reentrant": False}  # non-reentrant: no need for inputs that require grad
    if hasattr(policy, "activation_checkpointing_enable"):
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(policy, "gradient_checkpointing_enable"):
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            "trainer.gradient_checkpointing needs a model that supports activation checkpointing"
        )


# ---------------------------------------------------------------------------------------- the step
@dataclass
class _Normalisers:
    """A mini-batch's loss normalisers (counts over the whole mini-batch: on N ranks every rank holds
    every row and counts the same numbers, so nothing is reduced)."""

    grpo: float
    reinforce: float
    all: float


def _normalisers(batch: SequenceBatch, is_reinforce: Tensor, span: range, cfg: AlgorithmConfig) -> _Normalisers:
    mask, reinforce = batch.response_mask[span.start : span.stop], is_reinforce[span.start : span.stop]
    grpo, reinf = role_normalisers(mask, reinforce, cfg.combine == "add", cfg.loss_agg, cfg.loss_constant)
    return _Normalisers(grpo, reinf, loss_normaliser(mask, cfg.loss_agg, cfg.loss_constant))


# what clipped_token_loss returns; anything else a token loss returns is a flag to report as a fraction
_PPO_INDICATORS = ("ratio", "clipped_low", "clipped_high", "dual_clipped")


class _StepMeter:
    """Everything the step measures: token-weighted means over the whole batch, one loss value per
    mini-batch (averaged over mini-batches), the ratio extremes and the REINFORCE rows' ratios."""

    def __init__(self) -> None:
        self.means = _TokenMeans()
        self.losses: dict[str, list[float]] = defaultdict(list)
        self.extremes = {"actor/ratio_max": -math.inf, "actor/ratio_min": math.inf}
        self.reinforce_ratios: list[Tensor] = []

    @torch.no_grad()
    def micro_batch(self, logp, logp_t1, old, entropy, mask, reinforce_rows, ind) -> None:
        tokens = float(mask.sum())
        for key, value in policy_loss_diagnostics(logp, old, mask, ind).items():
            if key in ("ratio_max", "ratio_min"):
                pick = max if key == "ratio_max" else min
                self.extremes[f"actor/{key}"] = pick(self.extremes[f"actor/{key}"], value)
            else:
                self.means.add(f"actor/{key}", value, tokens)
        # entropy at T = 1 over every row (REINFORCE rows included: what entropy_rows "all" reads) and over
        # the policy rows only (entropy_rows "policy", the default)
        self.means.add("entropy/nll", nll_entropy(logp_t1.detach(), mask).item(), tokens)
        self.means.add("entropy/exact", exact_entropy(entropy.detach(), mask).item(), tokens)
        reinf = reinforce_rows.to(mask.dtype).unsqueeze(1)
        policy_mask = mask * (1.0 - reinf)
        policy_tokens = float(policy_mask.sum())
        if policy_tokens > 0:
            self.means.add("entropy/nll_policy_rows", nll_entropy(logp_t1.detach(), policy_mask).item(), policy_tokens)
            self.means.add("entropy/exact_policy_rows", exact_entropy(entropy.detach(), policy_mask).item(), policy_tokens)
        if bool(reinforce_rows.any()):
            self.reinforce_ratios.append(ind["ratio"].detach()[(mask * reinf).bool()].float())
        for key, flags in ind.items():  # an algorithm's own token flags (Clip-Cov's selection, ...)
            if key not in _PPO_INDICATORS:
                self.means.add(f"actor/{key}_frac", masked_mean(flags.float(), mask).item(), tokens)

    def mini_batch(self, losses: dict[str, float], has_grpo: bool, has_reinforce: bool, separate: bool) -> None:
        for key, value in losses.items():
            # "add" mode: each part is recorded for the mini-batches that hold its rows
            if separate and ((key == "loss/grpo" and not has_grpo) or (key == "loss/reinforce" and not has_reinforce)):
                continue
            self.losses[key].append(value)

    def absorb(self, other: _StepMeter) -> None:
        """Add another rank's token-weighted measurements (sums, counts, extremes, REINFORCE ratios)."""
        for key, value in other.means.sums.items():
            self.means.sums[key] += value
            self.means.counts[key] += other.means.counts[key]
        for key, value in other.extremes.items():
            pick = max if key == "actor/ratio_max" else min
            self.extremes[key] = pick(self.extremes[key], value)
        self.reinforce_ratios += other.reinforce_ratios

    def result(self) -> dict[str, float]:
        out = {key: sum(v) / len(v) for key, v in self.losses.items() if v}
        out.update(self.means.result())
        out.update({k: v for k, v in self.extremes.items() if math.isfinite(v)})
        if self.reinforce_ratios:
            ratios = torch.cat(self.reinforce_ratios)
            out["aepo/reinforce_ratio_min"] = ratios.min().item()
            out["aepo/reinforce_ratio_max"] = ratios.max().item()
        return out


class _Mismatch:
    """The rollout-trainer mismatch over the step's policy-row tokens (every row is in exactly one
    micro-batch of the step's one pass, so each token counts once)."""

    def __init__(self) -> None:
        self.sums = {"abs_sum": 0.0, "k3_sum": 0.0, "tokens": 0.0}
        self.max_abs = 0.0
        self.corrected = 0.0  # tokens whose correction weight is not 1

    def add(self, part: dict[str, float]) -> None:
        for key in self.sums:
            self.sums[key] += part[key]
        self.max_abs = max(self.max_abs, part["max_abs"])

    def absorb(self, other: _Mismatch) -> None:
        """Add another rank's sums (its policy-row tokens are not this rank's)."""
        self.add({**other.sums, "max_abs": other.max_abs})
        self.corrected += other.corrected

    def result(self) -> dict[str, float]:
        """mismatch/mean_abs_logp, max_abs_logp (nats), k3 (nats/token), corrected_fraction; {} when
        the batch carried no engine log-probs or no policy token."""
        tokens = self.sums["tokens"]
        if not tokens:
            return {}
        return {
            "mismatch/mean_abs_logp": self.sums["abs_sum"] / tokens,
            "mismatch/max_abs_logp": self.max_abs,
            "mismatch/k3": self.sums["k3_sum"] / tokens,
            "mismatch/corrected_fraction": self.corrected / tokens,
        }


def _padding_pass(policy, mb: SequenceBatch, device: torch.device, amp: torch.dtype | None) -> None:
    """A forward and a zero-weight backward pass (:func:`aepo_core.core.ranks.deal`): every weight
    takes part, as in a counted pass, so FSDP2 gathers and reduces each one; the gradient adds 0."""
    with _autocast(device, amp):
        logits = policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
    (logits.float().sum() * 0.0).backward()


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Clip the gradients of ``params`` to total L2 norm ``max_norm``; returns the norm before clipping.

    torch's clip_grad_norm_, split in its two halves so that the norm of sharded (DTensor)
    gradients is the norm over every rank's shard (``full_tensor``: one all-reduce) before it
    scales them; with plain tensors the same computation as ``clip_grad_norm_``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):  # a DTensor: each rank holds its shard's part of the norm
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def _merge_ranks(
    meter: _StepMeter, mismatch: _Mismatch, mb_losses: list[dict[str, float]], ranks: Ranks
) -> tuple[_StepMeter, _Mismatch, list[dict[str, float]]]:
    """The whole step's measurements from this rank's (its micro-batches only): the (sum, count)
    pairs and each mini-batch's loss parts added over ranks, in rank order. One rank: unchanged."""
    if ranks.world == 1:
        return meter, mismatch, mb_losses
    meter.reinforce_ratios = [t.cpu() for t in meter.reinforce_ratios]  # pickled: no device tensors across ranks
    parts = gather((meter, mismatch, mb_losses), ranks)
    meter, mismatch, mb_losses = _StepMeter(), _Mismatch(), [defaultdict(float) for _ in mb_losses]
    for other_meter, other_mismatch, other_losses in parts:
        meter.absorb(other_meter)
        mismatch.absorb(other_mismatch)
        for losses, other in zip(mb_losses, other_losses, strict=True):
            for key, value in other.items():
                losses[key] += value
    return meter, mismatch, [dict(losses) for losses in mb_losses]


def update_step(
    policy,
    optimizer: torch.optim.Optimizer,
    policy_batch: SequenceBatch,
    regulariser_batch: SequenceBatch | None,
    algorithm: Algorithm | AlgorithmConfig,
    trainer_cfg: TrainerConfig,
    decision: Decision | ControllerState,
    *,
    group_size: int,
    regulariser_group_size: int | None = None,
    ref_policy=None,
    progress: Callable[[int], None] | None = None,
    recompute_old_logprobs: bool | None = None,
    ranks: Ranks = SINGLE,
) -> UpdateResult:
    """One rollout's update of ``policy``: the generic PPO epoch (trainer.mini_batches optimiser steps).

    Args:
        policy: HF causal LM (``policy(input_ids=..., attention_mask=...).logits`` -> [b, L, V]); the
            batch is moved to the device of its parameters.
        optimizer: optimiser over the policy's trainable parameters (e.g. AdamW from trainer_cfg).
        policy_batch: [B, L] rows sampled at rollout.temperature (``temperatures`` set), groups of
            group_size consecutive rows, with 0/1 rewards.
        regulariser_batch: [M, L'] rows sampled at the decision's temperature, with rewards, in
            groups of regulariser_group_size (default group_size), or None.
        algorithm: the algorithm object (:mod:`aepo_core.core.algorithms`), or its config section.
        trainer_cfg: the trainer section.
        decision: the controller's decision for this iteration (or a controller state, decided here
            by ``algorithm.decide``: a convenience for scripts and tests).
        group_size: n, responses per prompt in policy_batch.
        regulariser_group_size: n of the regulariser batch, default group_size.
        ref_policy: frozen reference model for the k3 KL term (needed when kl_coef > 0), scored at
            the same temperatures as the policy.
        progress: called with the number of rows done after each micro-batch (progress bars).
        recompute_old_logprobs: run the separate no-grad pass for pi_old's log-probs. None (default):
            only when needed (several mini-batches, or an algorithm that reads pi_old's entropy).
        ranks: this process's rank and the world size when N processes train one sharded policy
            (FSDP2 with gradient divide factor 1: gradients are summed over ranks); every rank
            passes the same batches and gets the same result (aepo_core.core.ranks).
    Returns:
        UpdateResult(metrics, per-row records).

    The loss is normalised per mini-batch (micro-batch invariant), policy rows are scored at their
    sampling temperature and REINFORCE rows at T = 1 (module docstring). Warns (does not raise) when
    REINFORCE rows spill out of the first mini-batch.
    """
    algo = algorithm if isinstance(algorithm, Algorithm) else make_algorithm(algorithm)
    decision = decision if isinstance(decision, Decision) else algo.decide(decision)
    cfg = algo.cfg
    if cfg.kl_coef > 0 and ref_policy is None:
        raise ValueError("algorithm.kl_coef > 0 needs a ref_policy")
    device = next(policy.parameters()).device
    amp = autocast_dtype(device, trainer_cfg.dtype)
    chunk = trainer_cfg.logits_chunk
    if trainer_cfg.gradient_checkpointing:
        _enable_checkpointing(policy)

    # steps 4 and 8-10: advantages, and the algorithm's own rows (AEPO: positives, k, assembly)
    prepared = algo.prepare_batch(policy_batch, regulariser_batch, decision, group_size, regulariser_group_size)
    batch = prepared.batch.to(device)
    partition = _partition(batch.attention_mask.sum(dim=1).tolist(), trainer_cfg, ranks)
    _warn_spilled_reinforce_rows(prepared.k, partition, len(batch), trainer_cfg)
    temps = scoring_temperatures(batch)
    temps = temps.to(device) if temps is not None else None

    # step 11: pi_old's log-probs (one on-policy mini-batch: the training pass's own, detached)
    if recompute_old_logprobs is None:
        recompute_old_logprobs = len(partition) > 1 or algo.needs_old_entropy
    old_logp = old_entropy = ref_logp = None
    if recompute_old_logprobs:
        old_logp, old_entropy = compute_logprobs(policy, batch, partition, chunk, amp, algo.needs_old_entropy, temps,
                                                 ranks)
    if cfg.kl_coef > 0:
        ref_logp, _ = compute_logprobs(ref_policy, batch, partition, chunk, amp, temperatures=temps, ranks=ranks)
    batch = batch.with_fields(advantages=algo.shape_advantages(batch.advantages, old_entropy) * batch.response_mask)

    bonus_coef = algo.bonus_coef(decision)
    bonus_exact = bonus_coef > 0 and cfg.entropy_bonus_estimator == "exact"
    row_is_reinforce = [r == ROLE_REINFORCE for r in batch.roles]
    is_reinforce = torch.tensor(row_is_reinforce, dtype=torch.bool, device=device)
    row_tokens = batch.response_mask.sum(dim=1).tolist()  # one device sync for all rows
    params = [p for p in policy.parameters() if p.requires_grad]
    meter, grad_norms, skipped, row_mini_batch = _StepMeter(), [], 0, [0] * len(batch)
    mismatch, mb_losses = _Mismatch(), []  # the loss parts of each mini-batch (this rank's micro-batches)
    for mb_index, micro in enumerate(partition):
        for rows in micro:
            for r in rows:
                row_mini_batch[r] = mb_index

    was_training = policy.training
    policy.train()  # activation checkpointing needs train(); dropout is switched off instead
    try:
        with dropout_disabled(policy):
            for micro in partition:
                optimizer.zero_grad(set_to_none=True)
                span = _span(micro)
                norms = _normalisers(batch, is_reinforce, span, cfg)  # known before the first forward
                losses: dict[str, float] = defaultdict(float)
                # a micro-batch without response tokens has no gradient and measures nothing: left out
                for rows, counts in deal(micro, [any(row_tokens[r] for r in rows) for rows in micro], ranks):
                    sel = torch.as_tensor(list(rows), dtype=torch.long, device=device)
                    mb = batch.select(sel).trimmed()
                    if not counts:
                        _padding_pass(policy, mb, device, amp)
                        continue
                    mask = mb.response_mask
                    with _autocast(device, amp):
                        logp, logp_t1, entropy = _forward(
                            policy, mb, chunk, temps[sel] if temps is not None else None, True,
                            entropy_grad=bonus_exact, t1_grad=bonus_coef > 0,
                        )
                    logp, logp_t1 = logp.float(), logp_t1.float()
                    old = old_logp[sel, : mb.seq_len] if old_logp is not None else logp.detach()
                    token_loss, ind = algo.token_loss(logp, old, mb.advantages, mask)
                    if mb.rollout_logprobs is not None:  # the policy rows: the engine's log-probs vs pi_old's
                        policy_mask = mask * (~is_reinforce[sel]).unsqueeze(1).to(mask.dtype)
                        mismatch.add(rollout_mismatch(old, mb.rollout_logprobs, policy_mask))
                        if cfg.rollout_correction != "none":
                            w = rollout_correction_weights(old, mb.rollout_logprobs, policy_mask,
                                                           cfg.rollout_correction, cfg.rollout_correction_cap)
                            mismatch.corrected += float(((w != 1.0) & (policy_mask > 0)).sum())
                            token_loss = token_loss * torch.where(policy_mask > 0, w, torch.ones_like(w))
                    # replace: one shared normaliser; add: each part over its own rows (alpha: row weights)
                    grpo_sum, reinforce_sum = role_loss_sums(
                        token_loss * mb.weights.unsqueeze(1), mask, is_reinforce[sel], cfg.loss_agg
                    )
                    total = grpo_sum / norms.grpo + reinforce_sum / norms.reinforce
                    losses["loss/grpo"] += grpo_sum.item() / norms.grpo
                    losses["loss/reinforce"] += reinforce_sum.item() / norms.reinforce
                    if ref_logp is not None:
                        kl = loss_sum(kl_k3(logp, ref_logp[sel, : mb.seq_len]), mask, cfg.loss_agg) / norms.all
                        total = total + cfg.kl_coef * kl
                        losses["loss/kl"] += kl.item()
                    if bonus_coef > 0:
                        # exact: differentiable full-vocabulary entropy; nll: value -log p, gradient
                        # the score-function estimate of grad H (plain -log p has E[grad] = 0)
                        h = entropy if bonus_exact else nll_entropy_surrogate(logp_t1)
                        bonus = entropy_bonus_term(loss_sum(h, mask, cfg.loss_agg) / norms.all, bonus_coef)
                        total = total + bonus
                        losses["loss/entropy_bonus"] += bonus.item()
                    losses["loss/total"] += total.item()
                    total.backward()
                    meter.micro_batch(logp, logp_t1, old, entropy, mask, is_reinforce[sel], ind)
                    if progress is not None:
                        progress(len(rows))
                mb_losses.append(dict(losses))
                grad_norm = clip_grad_norm(params, trainer_cfg.grad_clip)
                grad_norms.append(grad_norm)
                if math.isfinite(grad_norm):
                    optimizer.step()
                else:
                    skipped += 1  # a non-finite gradient would poison the weights and the moments
                optimizer.zero_grad(set_to_none=True)
    finally:
        policy.train(was_training)

    meter, mismatch, mb_losses = _merge_ranks(meter, mismatch, mb_losses, ranks)
    for micro, losses in zip(partition, mb_losses, strict=True):
        span = _span(micro)
        if any(row_tokens[r] for r in span):  # a mini-batch's loss is recorded when it has tokens
            has = {row_is_reinforce[r] for r in span if row_tokens[r]}
            meter.mini_batch(losses, False in has, True in has, cfg.combine == "add")
    metrics = {**meter.result(), **prepared.info, **mismatch.result()}
    metrics.update(_step_summary(batch, prepared, decision, grad_norms, skipped, row_mini_batch, bonus_coef, cfg))
    return UpdateResult(metrics=metrics, rows=_row_records(batch, row_mini_batch, row_tokens))


def _warn_spilled_reinforce_rows(k: int, partition: list[list[range]], rows: int, trainer_cfg: TrainerConfig) -> None:
    first = sum(len(r) for r in partition[0]) if partition else 0
    if k > first:
        warnings.warn(
            f"{k} REINFORCE rows but the first (exactly on-policy) mini-batch holds only {first} of the "
            f"{rows} rows (trainer.mini_batches = {trainer_cfg.mini_batches}): {k - first} REINFORCE rows "
            "are trained off-policy in later mini-batches, where the clip can act on them",
            stacklevel=3,
        )


def _step_summary(batch, prepared, decision, grad_norms, skipped, row_mini_batch, bonus_coef, cfg) -> dict[str, float]:
    finite = [g for g in grad_norms if math.isfinite(g)]
    out = {
        "actor/grad_norm": sum(finite) / len(finite) if finite else float("nan"),
        "actor/grad_norm_max": max(grad_norms) if grad_norms else 0.0,
        "actor/skipped_steps": float(skipped),
        "actor/optimizer_steps": float(len(grad_norms) - skipped),
        "batch/rows": float(len(batch)),
        "batch/response_tokens": batch.response_mask.sum().item(),
        "aepo/num_positives": float(prepared.num_positives),
        "aepo/k": float(prepared.k),
        "aepo/reinforce_share": prepared.k / max(len(batch), 1),
        "controller/h_prev_in": decision.state.h_prev,
    }
    if decision.temperature is not None:
        out["aepo/temperature"] = float(decision.temperature)
    reinforce_rows = [i for i, r in enumerate(batch.roles) if r == ROLE_REINFORCE]
    if reinforce_rows:
        # 1.0 when every REINFORCE row was trained in the first (exactly on-policy) mini-batch
        out["aepo/reinforce_in_first_mini_batch"] = float(all(row_mini_batch[i] == 0 for i in reinforce_rows))
    if bonus_coef > 0:
        out["entropy/bonus_coef"] = bonus_coef
    return out


def _row_records(batch: SequenceBatch, row_mini_batch: list[int], row_tokens: list[float]) -> list[dict[str, Any]]:
    # one .tolist() per tensor: a single device sync each instead of one per element
    resp = batch.response_mask.float()
    adv_mean = ((batch.advantages * resp).sum(1) / resp.sum(1).clamp(min=1.0)).tolist()
    source_index = batch.source_index.tolist()
    rewards = batch.rewards.float().tolist()
    temperatures = batch.temperatures.float().tolist()
    weights = batch.weights.float().tolist()
    return [
        {
            "row": i,
            "mini_batch": row_mini_batch[i],
            "role": role,
            "source": "regulariser" if role == ROLE_REINFORCE else "policy",
            "source_index": int(source_index[i]),
            "reward": float(rewards[i]),
            "temperature": float(temperatures[i]),
            "weight": float(weights[i]),
            "advantage": float(adv_mean[i]),
            "response_tokens": int(row_tokens[i]),
        }
        for i, role in enumerate(batch.roles)
    ]


def make_optimizer(policy, trainer_cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over the policy's trainable parameters with trainer lr, betas and weight decay."""
    return torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=trainer_cfg.lr,
        betas=tuple(trainer_cfg.betas),
        weight_decay=trainer_cfg.weight_decay,
    )


def entropy_ahead(policy, optimizer: torch.optim.Optimizer, policy_batch: SequenceBatch, trainer_cfg: TrainerConfig,
                  ranks: Ranks = SINGLE, probe: float = PROBE) -> dict[str, float]:
    """The policy rows' entropy (both estimators, at T = 1) where AdamW's momentum will carry the
    policy, to first order.

    The look-ahead reading of ``algorithm.entropy_lookahead``: with d =
    :func:`aepo_core.core.lookahead.pending_momentum` (what the first moment still holds from the
    earlier updates), the rows are scored without grad at theta, theta + probe * d and
    theta - probe * d (parameters restored bit for bit), and
    :func:`aepo_core.core.lookahead.first_order_ahead` gives H(theta) + grad H . d. The update stage
    calls it before its step, on this iteration's policy rows: rows that d's gradients were not
    computed on, so the reading is not the step's effect on its own samples.

    Args:
        policy: the HF causal LM (before this iteration's ``update_step``).
        optimizer: its AdamW, with the earlier updates' moments loaded (none: d = 0, the reading now).
        policy_batch: [B, L] the rows sampled at rollout.temperature (any device).
        trainer_cfg: the trainer section (micro-batching, dtype, logits chunk).
        ranks: N ranks share the forward passes (:func:`compute_logprobs`).
        probe: the central difference's step, as a fraction of d.
    Returns:
        {"entropy/exact_policy_rows_ahead": nats/token, "entropy/nll_policy_rows_ahead": nats/token}.
    Costs three forward passes over the policy rows and one copy of the trainable parameters.
    """
    device = next(policy.parameters()).device
    batch = policy_batch.to(device)
    partition = _partition(batch.attention_mask.sum(dim=1).tolist(), trainer_cfg, ranks)
    mask = batch.response_mask
    moves = pending_momentum(optimizer)

    def readings(scale: float) -> tuple[float, float]:
        # at theta itself nothing moves: no copy of the parameters, no zero added to them
        with displaced([(p, d * scale) for p, d in moves]) if scale else contextlib.nullcontext():
            logp, ent = compute_logprobs(policy, batch, partition, trainer_cfg.logits_chunk,
                                         autocast_dtype(device, trainer_cfg.dtype), with_entropy=True, ranks=ranks)
        return exact_entropy(ent, mask).item(), nll_entropy(logp, mask).item()

    (exact, nll), (exact_up, nll_up), (exact_down, nll_down) = readings(0.0), readings(probe), readings(-probe)
    return {"entropy/exact_policy_rows_ahead": first_order_ahead(exact, exact_up, exact_down, probe),
            "entropy/nll_policy_rows_ahead": first_order_ahead(nll, nll_up, nll_down, probe)}
