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
     micro-batches of trainer.micro_batch_size rows with gradient accumulation; one optimiser step
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
tokens; constant: its rows times loss_constant (:func:`aepo_core.losses.loss_normaliser`) -- is
counted before the first forward pass, and every micro-batch's loss SUM is divided by it, so the
accumulated gradient is the same for any micro-batch partition (verl issue 5625 fixed the 1 / n_micro
weighting the same way). The counts add up over rows, so a distributed step all-reduces them. The
metrics are token-weighted over the whole batch (entropy, clip fractions, ratios) or one value per
mini-batch averaged over mini-batches (losses).

Combining the two row kinds (``algorithm.combine``, :func:`aepo_core.losses.role_losses`):
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aepo_core.advantages import broadcast_to_tokens, group_advantages
from aepo_core.aepo import (
    ControllerState,
    assemble_batch,
    reinforce_count,
    select_positive_samples,
)
from aepo_core.baselines import (
    entropy_bonus_term,
    entropy_shaped_advantages,
    nll_entropy_surrogate,
    update_entropy_coef,
)
from aepo_core.batch import ROLE_REINFORCE, SequenceBatch
from aepo_core.config import AlgorithmConfig, TrainerConfig
from aepo_core.entropy import shifted_logprobs_and_entropy
from aepo_core.losses import (
    clipped_token_loss,
    kl_k3,
    loss_normaliser,
    loss_sum,
    masked_mean,
    policy_loss_diagnostics,
    role_loss_sums,
    role_normalisers,
)


@dataclass
class UpdateResult:
    """What one update step returns.

    metrics: flat name -> float (names contain only letters, digits, '_', '/', '.').
    rows: one record per row of the assembled batch, in batch order: row, mini_batch, role,
        source ("policy" | "regulariser"), source_index, reward, temperature, weight, advantage
        (mean over the row's response tokens of the advantage used), response_tokens.
    controller: the controller state for the next step.
    """

    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    controller: ControllerState


@dataclass
class PreparedBatch:
    """Output of :func:`prepare_update_batch`: the batch X plus what the controller decided."""

    batch: SequenceBatch
    num_positives: int = 0
    k: int = 0
    temperature: float | None = None
    info: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- devices
def resolve_device(trainer_cfg: TrainerConfig) -> torch.device:
    """trainer.device -> torch.device ("auto": cuda when available, else cpu)."""
    if trainer_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(trainer_cfg.device)


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


def split_micro(rows: range, micro_batch_size: int | None) -> list[range]:
    """Consecutive chunks of at most micro_batch_size rows of ``rows`` (one chunk when None)."""
    if micro_batch_size is None or micro_batch_size >= len(rows):
        return [rows]
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def _partition(num_rows: int, trainer_cfg: TrainerConfig) -> list[list[range]]:
    return [
        split_micro(mb, trainer_cfg.micro_batch_size)
        for mb in split_in_order(num_rows, trainer_cfg.mini_batches)
    ]


# ---------------------------------------------------------------------------------------- assembly
def prepare_update_batch(
    policy_batch: SequenceBatch,
    regulariser_batch: SequenceBatch | None,
    algo_cfg: AlgorithmConfig,
    controller: ControllerState,
    group_size: int,
    regulariser_group_size: int | None = None,
) -> PreparedBatch:
    """Advantages, positive selection and batch assembly (steps 4 and 8-10), no model involved.

    Args:
        policy_batch: B rows, groups of group_size consecutive rows, rewards set.
        regulariser_batch: M rows sampled at temperature T (aepo only), or None.
        algo_cfg: the algorithm configuration.
        controller: the state entering this step (h_prev decides the k halving).
        group_size: n for the policy batch.
        regulariser_group_size: n for the regulariser batch (default: group_size).
    Returns:
        PreparedBatch with the assembled batch X (advantages [|X|, L] set, REINFORCE rows first),
        |POS|, k and the regulariser temperature.
    """
    if regulariser_batch is not None and algo_cfg.name != "aepo":
        raise ValueError(f"algorithm {algo_cfg.name!r} does not use a regulariser batch")
    adv = group_advantages(policy_batch.rewards, group_size, algo_cfg.advantage_scaling)
    policy_rows = policy_batch.with_fields(advantages=broadcast_to_tokens(adv, policy_batch.response_mask))
    info: dict[str, float] = {
        "advantage/mean": adv.mean().item(),
        "advantage/abs_mean": adv.abs().mean().item(),
    }
    if regulariser_batch is None or len(regulariser_batch) == 0:
        return PreparedBatch(
            batch=assemble_batch(policy_rows, None, torch.zeros(0, dtype=torch.long), 0), info=info
        )
    adv_t = group_advantages(
        regulariser_batch.rewards, regulariser_group_size or group_size, algo_cfg.advantage_scaling
    )
    positives = select_positive_samples(adv_t, algo_cfg.positive_threshold)
    k = reinforce_count(
        len(positives),
        algo_cfg.reinforce_sample_num,
        controller.h_prev,
        algo_cfg.target_entropy,
        algo_cfg.halve_above_target,
    )
    if algo_cfg.combine == "replace":
        k = min(k, len(policy_batch))
    batch = assemble_batch(policy_rows, regulariser_batch, positives, k, algo_cfg.combine, algo_cfg.alpha)
    info["aepo/regulariser_reward_mean"] = regulariser_batch.rewards.float().mean().item()
    return PreparedBatch(
        batch=batch,
        num_positives=len(positives),
        k=k,
        temperature=regulariser_batch.temperatures.float().mean().item(),
        info=info,
    )


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
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and exact entropy) of every row, without grad, micro-batch by micro-batch.

    Args:
        model: HF causal LM.
        batch: [B, L] on the model's device.
        partition: mini-batches of micro-batch row ranges (use the update's partition so the
            numerics of the first mini-batch match the update exactly).
        chunk: sequence chunk for the log-softmax.
        amp_dtype: autocast dtype or None.
        with_entropy: also return the per-token exact entropy (at T = 1).
        temperatures: [B] scoring temperature per row (:func:`scoring_temperatures`); None: T = 1.
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
            for rows in micro:
                mb = batch.select(list(rows)).trimmed()
                temps = temperatures[rows.start : rows.stop] if temperatures is not None else None
                with _autocast(device, amp_dtype):
                    lp, _, h = _forward(model, mb, chunk, temps, with_entropy, entropy_grad=False)
                logp[rows.start : rows.stop, : mb.seq_len] = lp.float()
                if with_entropy:
                    ent[rows.start : rows.stop, : mb.seq_len] = h.float()
    finally:
        model.train(was_training)
    return logp, ent


class _TokenMeans:
    """Token-weighted means over everything a step measured: sum(value * tokens) / sum(tokens).

    Each micro-batch adds (its mean, its token count), so the result is the mean over all tokens
    whatever the micro-batch partition; (sum, count) pairs are what a distributed step all-reduces.
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
def update_step(
    policy,
    optimizer: torch.optim.Optimizer,
    policy_batch: SequenceBatch,
    regulariser_batch: SequenceBatch | None,
    algo_cfg: AlgorithmConfig,
    trainer_cfg: TrainerConfig,
    controller: ControllerState,
    *,
    group_size: int,
    regulariser_group_size: int | None = None,
    ref_policy=None,
    progress: Callable[[int], None] | None = None,
    recompute_old_logprobs: bool | None = None,
) -> UpdateResult:
    """One rollout's update of ``policy`` (1 PPO epoch, trainer.mini_batches optimiser steps).

    Args:
        policy: HF causal LM (``policy(input_ids=..., attention_mask=...).logits`` -> [b, L, V]); the
            batch is moved to the device of its parameters.
        optimizer: optimiser over the policy's trainable parameters (e.g. AdamW from trainer_cfg).
        policy_batch: [B, L] rows sampled at rollout.temperature (``temperatures`` set), groups of
            group_size consecutive rows, with 0/1 rewards.
        regulariser_batch: [M, L'] rows for the first reg_prompt_fraction of the prompts sampled at the
            controller's temperature (temperatures set), with rewards, in groups of
            regulariser_group_size (default group_size); only for algorithm "aepo", else None.
        algo_cfg, trainer_cfg: configuration.
        controller: the controller state entering this step.
        group_size: n, responses per prompt in policy_batch.
        regulariser_group_size: n of the regulariser batch, default group_size.
        ref_policy: reference model for the k3 KL term (needed when algo_cfg.kl_coef > 0), never
            trained; scored at the same temperatures as the policy.
        progress: called with the number of rows done after each micro-batch (progress bars).
        recompute_old_logprobs: run the separate no-grad pass for pi_old's log-probs. None (default):
            only when needed, i.e. with more than one mini-batch or for entropy_adv; otherwise the
            single on-policy mini-batch uses its own detached log-probs (ratio exactly 1).
    Returns:
        UpdateResult(metrics, per-row records, new controller state).

    Gradient accumulation divides each micro-batch's loss sum by the mini-batch's normaliser, so the
    step does not depend on the micro-batch partition; micro-batches with no response token are
    skipped. Policy rows are scored at their sampling temperature, REINFORCE rows at T = 1
    (:func:`scoring_temperatures`). Warns (does not raise) when the k REINFORCE rows do not all fit in the first
    mini-batch. Dropout is disabled for all forward passes (see the module docstring).
    """
    name = algo_cfg.name
    if algo_cfg.kl_coef > 0 and ref_policy is None:
        raise ValueError("algorithm.kl_coef > 0 needs a ref_policy")
    device = next(policy.parameters()).device
    amp_dtype = autocast_dtype(device, trainer_cfg.dtype)
    if trainer_cfg.gradient_checkpointing:
        _enable_checkpointing(policy)

    prepared = prepare_update_batch(
        policy_batch, regulariser_batch, algo_cfg, controller, group_size, regulariser_group_size
    )
    batch = prepared.batch.to(device)
    partition = _partition(len(batch), trainer_cfg)
    chunk = trainer_cfg.logits_chunk
    first_mini_batch_rows = sum(len(rows) for rows in partition[0]) if partition else 0
    if prepared.k > first_mini_batch_rows:
        warnings.warn(
            f"{prepared.k} REINFORCE rows but the first (exactly on-policy) mini-batch holds only "
            f"{first_mini_batch_rows} of the {len(batch)} rows (trainer.mini_batches = "
            f"{trainer_cfg.mini_batches}): {prepared.k - first_mini_batch_rows} REINFORCE rows are "
            "trained off-policy in later mini-batches, where the clip can act on them",
            stacklevel=2,
        )

    # step 11: old log-probs of every row at its scoring temperature (scoring_temperatures: the
    # sampling temperature for policy rows, T = 1 for REINFORCE rows). With a single mini-batch the
    # update is exactly on-policy (pi_old = pi_theta), so by default the training forward pass's own
    # detached log-probs serve as the old ones and the extra no-grad pass is skipped; entropy_adv
    # still needs pi_old's entropy before its first forward pass.
    temps = scoring_temperatures(batch)
    if temps is not None:
        temps = temps.to(device)
    if recompute_old_logprobs is None:
        recompute_old_logprobs = len(partition) > 1 or name == "entropy_adv"
    old_logp = old_entropy = None
    if recompute_old_logprobs:
        old_logp, old_entropy = compute_logprobs(
            policy, batch, partition, chunk, amp_dtype, with_entropy=(name == "entropy_adv"), temperatures=temps
        )
    ref_logp = None
    if algo_cfg.kl_coef > 0:
        ref_logp, _ = compute_logprobs(ref_policy, batch, partition, chunk, amp_dtype, temperatures=temps)

    advantages = batch.advantages
    if name == "entropy_adv":
        advantages = (
            entropy_shaped_advantages(
                advantages, old_entropy, algo_cfg.entropy_adv_alpha, algo_cfg.entropy_adv_kappa
            )
            * batch.response_mask
        )
    batch = batch.with_fields(advantages=advantages)

    if name == "entropy_reg":
        bonus_coef = algo_cfg.entropy_coef
    elif name == "adaptive_entropy":
        bonus_coef = controller.entropy_coef
    else:
        bonus_coef = 0.0
    bonus_exact = bonus_coef > 0 and algo_cfg.entropy_bonus_estimator == "exact"

    row_is_reinforce = [r == ROLE_REINFORCE for r in batch.roles]
    is_reinforce = torch.tensor(row_is_reinforce, dtype=torch.bool, device=device)
    # one device sync for all rows, instead of one per micro-batch
    row_tokens = batch.response_mask.sum(dim=1).tolist()
    separate = algo_cfg.combine == "add"
    mode, constant = algo_cfg.loss_agg, algo_cfg.loss_constant
    params = [p for p in policy.parameters() if p.requires_grad]
    means = _TokenMeans()  # token-weighted metrics over the whole batch
    per_mini_batch: dict[str, list[float]] = defaultdict(list)  # losses: one value per mini-batch
    ratio_extremes: dict[str, float] = {"actor/ratio_max": -math.inf, "actor/ratio_min": math.inf}
    reinforce_ratios: list[Tensor] = []
    grad_norms: list[float] = []
    skipped = 0
    row_mini_batch = [0] * len(batch)

    def has_tokens(rows: range, reinforce: bool | None = None) -> bool:
        return any(
            row_tokens[r] > 0 and (reinforce is None or row_is_reinforce[r] == reinforce) for r in rows
        )

    was_training = policy.training
    policy.train()  # activation checkpointing needs train(); dropout is switched off instead
    try:
        with dropout_disabled(policy):
            for mb_index, micro in enumerate(partition):
                optimizer.zero_grad(set_to_none=True)
                # The mini-batch's normalisers, known before its first forward pass: every
                # micro-batch's loss sum is divided by them, so the step is the mini-batch's
                # aggregate whatever the micro-batch partition (see the module docstring).
                span = slice(micro[0].start, micro[-1].stop)
                mb_mask, mb_reinforce = batch.response_mask[span], is_reinforce[span]
                norm_grpo, norm_reinf = role_normalisers(mb_mask, mb_reinforce, separate, mode, constant)
                norm_all = loss_normaliser(mb_mask, mode, constant)
                mb_losses: dict[str, float] = defaultdict(float)
                for rows in micro:
                    for r in rows:
                        row_mini_batch[r] = mb_index
                    if not has_tokens(rows):
                        continue  # no response token: no gradient, nothing to measure
                    sel = slice(rows.start, rows.stop)
                    mb = batch.select(list(rows)).trimmed()
                    length = mb.seq_len
                    mask = mb.response_mask
                    mb_temps = temps[sel] if temps is not None else None
                    with _autocast(device, amp_dtype):
                        logp, logp_t1, token_entropy = _forward(
                            policy, mb, chunk, mb_temps, True, entropy_grad=bonus_exact,
                            t1_grad=bonus_coef > 0,
                        )
                    logp, logp_t1 = logp.float(), logp_t1.float()
                    old = old_logp[sel, :length] if old_logp is not None else logp.detach()
                    token_loss, ind = clipped_token_loss(
                        logp, old, mb.advantages, algo_cfg.clip_low, algo_cfg.clip_high, algo_cfg.dual_clip
                    )
                    token_loss = token_loss * mb.weights.unsqueeze(1)
                    reinf_rows = is_reinforce[sel]
                    # replace: one shared normaliser; add: each part over its own rows' tokens, alpha
                    # carried by the row weights
                    grpo_sum, reinforce_sum = role_loss_sums(token_loss, mask, reinf_rows, mode)
                    total = grpo_sum / norm_grpo + reinforce_sum / norm_reinf
                    mb_losses["loss/grpo"] += grpo_sum.item() / norm_grpo
                    mb_losses["loss/reinforce"] += reinforce_sum.item() / norm_reinf
                    if ref_logp is not None:
                        kl = loss_sum(kl_k3(logp, ref_logp[sel, :length]), mask, mode) / norm_all
                        total = total + algo_cfg.kl_coef * kl
                        mb_losses["loss/kl"] += kl.item()
                    if bonus_coef > 0:
                        # exact: differentiable full-vocabulary entropy; nll: value -log p, gradient
                        # the score-function estimate of grad H (plain -log p has E[grad] = 0)
                        bonus_entropy = token_entropy if bonus_exact else nll_entropy_surrogate(logp_t1)
                        bonus = entropy_bonus_term(loss_sum(bonus_entropy, mask, mode) / norm_all, bonus_coef)
                        total = total + bonus
                        mb_losses["loss/entropy_bonus"] += bonus.item()
                    mb_losses["loss/total"] += total.item()
                    total.backward()
                    if progress is not None:
                        progress(len(rows))

                    with torch.no_grad():
                        tokens = float(mask.sum())
                        diagnostics = policy_loss_diagnostics(logp, old, mask, ind)
                        for key, value in diagnostics.items():
                            if key in ("ratio_max", "ratio_min"):
                                pick = max if key == "ratio_max" else min
                                ratio_extremes[f"actor/{key}"] = pick(ratio_extremes[f"actor/{key}"], value)
                            else:
                                means.add(f"actor/{key}", value, tokens)
                        # the entropy the controller reads: at T = 1, over every row (reference code)
                        means.add("entropy/nll", masked_mean(-logp_t1.detach(), mask).item(), tokens)
                        means.add("entropy/exact", masked_mean(token_entropy.detach(), mask).item(), tokens)
                        policy_mask = mask * (1.0 - reinf_rows.to(mask.dtype).unsqueeze(1))
                        policy_tokens = float(policy_mask.sum())
                        if policy_tokens > 0:
                            means.add("entropy/nll_policy_rows", masked_mean(-logp_t1.detach(), policy_mask).item(), policy_tokens)
                            means.add("entropy/exact_policy_rows", masked_mean(token_entropy.detach(), policy_mask).item(), policy_tokens)
                        if has_tokens(rows, True):
                            reinf_mask = (mask * reinf_rows.to(mask.dtype).unsqueeze(1)).bool()
                            reinforce_ratios.append(ind["ratio"].detach()[reinf_mask].float())
                span_rows = range(span.start, span.stop)
                if has_tokens(span_rows):
                    for key, value in mb_losses.items():
                        # add mode: a part is recorded for the mini-batches that hold its rows
                        if separate and key == "loss/grpo" and not has_tokens(span_rows, False):
                            continue
                        if separate and key == "loss/reinforce" and not has_tokens(span_rows, True):
                            continue
                        per_mini_batch[key].append(value)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, trainer_cfg.grad_clip)
                grad_norms.append(float(grad_norm))
                if math.isfinite(float(grad_norm)):
                    optimizer.step()
                else:
                    # a non-finite gradient would poison the weights and the optimiser moments
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
    finally:
        policy.train(was_training)

    metrics: dict[str, float] = {key: sum(v) / len(v) for key, v in per_mini_batch.items() if v}
    metrics.update(means.result())
    metrics.update({k: v for k, v in ratio_extremes.items() if math.isfinite(v)})
    metrics.update(prepared.info)
    finite_norms = [g for g in grad_norms if math.isfinite(g)]
    metrics["actor/grad_norm"] = sum(finite_norms) / len(finite_norms) if finite_norms else float("nan")
    metrics["actor/grad_norm_max"] = max(grad_norms) if grad_norms else 0.0
    metrics["actor/skipped_steps"] = float(skipped)
    metrics["actor/optimizer_steps"] = float(len(grad_norms) - skipped)
    metrics["batch/rows"] = float(len(batch))
    metrics["batch/response_tokens"] = batch.response_mask.sum().item()
    metrics["aepo/num_positives"] = float(prepared.num_positives)
    metrics["aepo/k"] = float(prepared.k)
    metrics["aepo/reinforce_share"] = prepared.k / max(len(batch), 1)
    if prepared.temperature is not None:
        metrics["aepo/temperature"] = prepared.temperature
    if reinforce_ratios:
        all_ratios = torch.cat(reinforce_ratios)
        metrics["aepo/reinforce_ratio_min"] = all_ratios.min().item()
        metrics["aepo/reinforce_ratio_max"] = all_ratios.max().item()
        # 1.0 when every REINFORCE row was trained in the first (exactly on-policy) mini-batch
        metrics["aepo/reinforce_in_first_mini_batch"] = float(
            all(row_mini_batch[i] == 0 for i, r in enumerate(batch.roles) if r == ROLE_REINFORCE)
        )

    measured = metrics.get(f"entropy/{algo_cfg.entropy_estimator}", controller.h_prev)
    new_coef = controller.entropy_coef
    if name == "adaptive_entropy":
        new_coef = update_entropy_coef(
            controller.entropy_coef, measured, algo_cfg.target_entropy, algo_cfg.adaptive_delta
        )
        metrics["entropy/adaptive_coef"] = new_coef
    if bonus_coef > 0:
        metrics["entropy/bonus_coef"] = bonus_coef
    metrics["controller/h_prev_in"] = controller.h_prev
    metrics["controller/h_prev_out"] = float(measured)
    new_state = ControllerState(
        h_prev=float(measured),
        temperature=prepared.temperature,
        k=prepared.k,
        num_positives=prepared.num_positives,
        entropy_coef=float(new_coef),
        step=controller.step + 1,
    )

    # one .tolist() per tensor: a single device sync each instead of one per element
    resp = batch.response_mask.float()
    adv_mean = ((batch.advantages * resp).sum(1) / resp.sum(1).clamp(min=1.0)).tolist()
    source_index = batch.source_index.tolist()
    rewards = batch.rewards.float().tolist()
    temperatures = batch.temperatures.float().tolist()
    weights = batch.weights.float().tolist()
    records = [
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
    return UpdateResult(metrics=metrics, rows=records, controller=new_state)


def make_optimizer(policy, trainer_cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over the policy's trainable parameters with trainer lr, betas and weight decay."""
    return torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=trainer_cfg.lr,
        betas=tuple(trainer_cfg.betas),
        weight_decay=trainer_cfg.weight_decay,
    )
