"""The one typed configuration of a run, loaded from YAML with dotted command-line overrides.

Every knob of the pipeline lives here, grouped as the stages use them. Unknown or ill-typed keys
fail with a `ConfigError` that names the key and the file (or the override) it came from.

    cfg = load_config("my.yaml", overrides=["algorithm.target_entropy=0.75", "rollout.n=8"])
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aepo_core.errors import UserError


class ConfigError(UserError):
    """A configuration file or override is wrong; the message names the key and where it came from."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The projection layers of Qwen2 / Llama-style decoders: every linear layer of a block.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(_Section):
    """model.lora: train low-rank adapters (the `peft` library) instead of every weight.

    The update trains only the adapters on the frozen starting policy; each update still writes the
    merged weights as `policy/` (what the engines read) and the adapter as `adapter/`
    (aepo_core/io/lora.py). Fixed when a run is created, like the rest of `model`.
    """

    enabled: bool = False
    rank: int = Field(8, ge=1, description="r: the adapters' inner dimension")
    alpha: float = Field(16.0, gt=0.0, description="scaling: the adapter's output is multiplied by alpha / rank")
    # passed to peft; the update itself runs with every dropout off, LoRA's included, so that its first
    # mini-batch's ratio is exactly 1 (aepo_core.core.update.dropout_disabled): no effect in training here
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        if any(not n.strip() for n in names):
            raise ValueError("module names must not be empty")
        if len(set(names)) != len(names):
            raise ValueError(f"module names repeat: {names}")
        return names


class ModelConfig(_Section):
    # None means the embedded default: the tiny base policy built locally (aepo build-base).
    path: str | None = None
    # Where the embedded base policy is built and cached (default: ~/.cache/aepo/base-<seed>).
    cache_dir: str | None = None
    trust_remote_code: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)


# Keys added after runs existed, with the value they were added at. While a config holds that value
# the key is left out of the config digests (aepo_core.pipeline.stages.digest_tree), so adding it
# neither makes existing runs' stages stale nor changes the default run name of a config.
ADDED_LATER: dict[str, Any] = {"model.lora": LoraConfig().model_dump(mode="json"),
                                "algorithm.rollout_correction": "none", "algorithm.rollout_correction_cap": 3.0}

# Keys that say how a stage is computed, not what it computes: left out of every config digest
# whatever their value (aepo_core.pipeline.stages.digest_tree), so a run may continue with another
# value (started on 2 ranks, resumed on 1) without a stage turning stale or the start being refused.
# ADDED_LATER would not do for these: it leaves a key out only at the value it was added at.
EXECUTION_ONLY: tuple[str, ...] = ("trainer.nproc", "rollout.data_parallel", "run.ray_address")


class SyntheticTaskConfig(_Section):
    """The embedded task: add distinct digits mod 10 with a running-sum trace in any order."""

    seed: int = 1234
    n_train: int = 20000
    n_eval: int = 256
    min_terms: int = Field(4, ge=2)
    max_terms: int = Field(7, ge=2)
    max_value: int = Field(9, le=9, description="terms are distinct digits 1..max_value")


class DataConfig(_Section):
    # "synthetic" for the embedded task, or a path to a local parquet / jsonl / json / csv file.
    train: str = "synthetic"
    eval: str | None = None  # None: the synthetic held-out split, or no separate eval set for files
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    id_column: str | None = None
    source_column: str | None = None
    # The held-out file may use another layout (e.g. DAPO-Math-17k for training, MATH-500 for eval).
    eval_prompt_column: str | None = None  # None: prompt_column
    eval_answer_column: str | None = None  # None: answer_column
    # How the reward is computed: the synthetic task's verifier or math-verify on \boxed{} answers.
    verifier: Literal["synthetic", "math"] = "synthetic"
    # What the math verifier reads as a response's final answer: its last complete \boxed{}/\fbox{}
    # ("boxed"), or with "boxed_or_last_number" also, in a response without any box, one number stated
    # as the answer ("the answer is 6", or a last line that is one number). aepo_core/io/verifiers.py.
    math_answer: Literal["boxed", "boxed_or_last_number"] = "boxed"
    # Text appended to each user prompt before the chat template (e.g. the math format instruction).
    prompt_suffix: str = ""
    synthetic: SyntheticTaskConfig = Field(default_factory=SyntheticTaskConfig)


class VLLMConfig(_Section):
    """vLLM engine options (rollout.engine == "vllm")."""

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="leave room for the update step")
    max_model_len: int | None = Field(None, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enforce_eager: bool = False
    # Free the engine's GPU memory while the update step runs (vLLM sleep mode; a no-op on CPUs).
    sleep_between_iterations: bool = False


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = "hf"
    n: int = Field(8, ge=1, description="responses per prompt (2 or more: a group of one has no advantage)")
    prompts_per_batch: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    # > 0: training needs log-probabilities (greedy rows have none); policy rows are trained at this
    # temperature (aepo_core.core.update.scoring_temperatures)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    # AEPO's regulariser prompts: "all": every one, in the policy batch's engine call (the reference
    # code; best where extra rows in a batch are nearly free, as on GPUs); "in_order": a few at a time,
    # in prompt order, stopping once the first K rows the REINFORCE term can train are known (the same
    # rows: stages.sample_rollout), which saves generation where rows cost in proportion, as on CPUs
    regulariser_sampling: Literal["all", "in_order"] = "all"
    # HF engine: rows sampled in one forward batch (None: all rows at once). 512 bounds the KV cache
    # and logits of large batches (256 prompts x 10 rows: peak memory 4.4 -> 2.1 GiB with the update's
    # token budget below, docs/performance.md) at no cost in speed; samples do not depend on it
    batch_size: int | None = Field(512, ge=1)
    # engine processes the rollout and evaluation stages run on (torchrun; each a contiguous shard of
    # the requests: aepo_core/io/engines/data_parallel.py): 1 is the engine in the flow's own process.
    # Execution only (EXECUTION_ONLY): the table is the same for any value
    data_parallel: int = Field(1, ge=1, description="rollout/evaluation engine processes (torchrun ranks, or Ray actors with run.ray_address); 1: in the flow's own process")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @field_validator("n")
    @classmethod
    def _group_of_two_or_more(cls, n: int) -> int:
        # every algorithm's policy loss compares a response with the other responses to its prompt:
        # with one response per prompt every advantage is 0 and nothing is trained
        if n == 1:
            raise ValueError("a group of one response per prompt has no advantage (loss 0, nothing is trained); "
                             "set rollout.n to 2 or more (the default is 8)")
        return n


class AlgorithmConfig(_Section):
    # one class each in aepo_core/core/algorithms.py (the registry)
    name: Literal["grpo", "aepo", "entropy_reg", "entropy_adv", "adaptive_entropy", "clip_cov", "kl_cov"] = "aepo"
    # --- AEPO (aepo-algorithm.md) ---
    # H* in the units of entropy_estimator. The paper's targets are 0.25-1.0 (nll, 7B math models);
    # the embedded base policy starts near 0.145 nats/token and a correct policy has at most 0.235,
    # so its default target sits just above the start, where GRPO alone would pull it down.
    target_entropy: float = Field(0.15, ge=0.0, description="H*, in the units of entropy_estimator")
    entropy_estimator: Literal["nll", "exact"] = "nll"
    t_high: float = Field(1.2, gt=0.0)
    t_low: float = Field(0.8, gt=0.0)
    # Which update rows the controller's entropy reading covers. "all": every row of the update batch,
    # the REINFORCE rows sampled at the controller's temperature included (the reference code);
    # "policy" (default, a deliberate deviation): only the rows sampled at rollout.temperature. The
    # tempered rows bias the reading towards the controller's own action: with 32 REINFORCE rows at
    # T = 1.5 all rows read 0.30 while the policy rows measured 0.17, and bang-bang switched the wrong
    # way after one step (docs/architecture.md, "Algorithm choices").
    entropy_rows: Literal["all", "policy"] = "policy"
    # bang_bang: the paper's reference controller (t_high / t_low); fixed: ablation
    # (fixed_temperature); adaptive: proportional-integral action on T within [adaptive_t_min,
    # adaptive_t_max] (aepo_core.core.aepo.adaptive_integral / adaptive_output).
    controller: Literal["bang_bang", "fixed", "adaptive"] = "bang_bang"
    fixed_temperature: float = Field(1.2, gt=0.0, description="used when controller == fixed")
    adaptive_t_min: float = Field(0.6, gt=0.0, description="adaptive controller: lowest regulariser temperature")
    adaptive_t_max: float = Field(1.5, gt=0.0, description="adaptive controller: highest regulariser temperature")
    adaptive_t_init: float = Field(1.0, gt=0.0, description="adaptive controller: temperature before any measurement")
    # integral gain: the balance temperature's change per iteration per unit of relative error
    # (H* - h) / H*; proportional gain: the temperature offset per unit of relative error. T sets the
    # *rate* at which entropy moves, so integral action alone oscillates (measured: target 0.08,
    # gain 0.25, T wound up to 1.45 and entropy overshot 25%); the proportional term damps it.
    adaptive_gain: float = Field(0.05, ge=0.0, description="adaptive controller: integral gain (dT/iteration per unit relative error)")
    adaptive_kp: float = Field(1.0, ge=0.0, description="adaptive controller: proportional gain (dT per unit relative error)")
    # The proportional gain while entropy is above the target (None: adaptive_kp). GRPO's pull already
    # pushes down, and a full drop of T was followed by undershoots lasting 10-40 iterations
    # (docs/results.md); a smaller gain there is the adaptive form of the reference's halved k.
    # Measured at 0.08 on the CPU (0.5, 4 seeds): worse, 28.2 / 8.7 / 11.5 / 11.1% against 11.1 / 8.1 /
    # 12.2 / 8.2% without.
    adaptive_kp_above: float | None = Field(None, ge=0.0, description="adaptive controller: proportional gain while entropy is above the target (None: adaptive_kp)")
    # derivative gain: the temperature taken off per unit of the smoothed reading's relative rise per
    # iteration; 0 is the PI law. The optimiser's momentum delays a step's effect on entropy by about
    # ten steps, and acting on the trend answers that lag (aepo_core.core.aepo.adaptive_output).
    adaptive_kd: float = Field(0.0, ge=0.0, description="adaptive controller: derivative gain (dT per unit relative change per iteration)")
    adaptive_smoothing: float = Field(0.8, ge=0.0, lt=1.0, description="adaptive controller: weight of the past in the derivative's smoothed reading")
    # The second actuator (split range; off at 0): once T sits at a clamp the controller's output goes
    # on past it and scales alpha, alpha * (1 + adaptive_alpha_gain * distance past the clamp), up to
    # alpha * adaptive_alpha_max, in both directions -- near T = 1.5 the tempered batch has few correct
    # rows left to push up with, and at T = 0.6 the push down is weak (aepo_core.core.aepo.split_range).
    adaptive_alpha_gain: float = Field(0.0, ge=0.0, description="adaptive controller: alpha's scale per unit of output past T's clamps (0: T only)")
    adaptive_alpha_max: float = Field(3.0, ge=1.0, description="adaptive controller: the most alpha is scaled by")
    # With the second actuator: let the integral carry past adaptive_t_max into alpha's range (upwards
    # only), so a balance that needs more push than T = adaptive_t_max leaves no steady offset; off,
    # the integral stays within T's clamps (aepo_core.core.aepo.integral_range).
    adaptive_integral_past_t_max: bool = False
    # Hold the integral while the smoothed reading (adaptive_smoothing) already moves towards the
    # target, so the optimiser's lag does not turn the approach into an overshoot; off: integrate
    # every measured error (aepo_core.core.aepo.adaptive_integral).
    adaptive_hold_while_closing: bool = False
    # The proportional term on the smoothed reading (adaptive_smoothing) instead of the last one: less
    # of the reading's noise passed into T, for some lag (aepo_core.core.aepo.controller_action).
    # Measured at 0.08 on the CPU (smoothing 0.5, 2 seeds): worse, 15.0 / 13.8% against 11.1 / 8.1%.
    adaptive_proportional_smoothed: bool = False
    # The controller reads the policy rows' entropy where AdamW's momentum will carry the policy (its
    # first moment's pending steps, to first order: aepo_core.core.lookahead) instead of where it is: the
    # optimiser's part of the loop's ~10-iteration lag, taken out as a Smith predictor would. The
    # proportional (and derivative) term reads ahead; the adaptive controller's integral, the target,
    # the plots and |H - H*| stay on the policy's own reading. One process only (trainer.nproc 1).
    # Measured at 0.08 on the CPU (64 prompts, T in [0.6, 1.4] with alpha, 2 seeds): 10.7 / 12.2%,
    # the means under the target (docs/results.md), so it is off by default.
    entropy_lookahead: bool = False
    # Iterations the actuator may sit at a clamp, the error keeping its sign, before the entropy stage
    # says the target is not reached (aepo_core.core.algorithms.reachability).
    reach_window: int = Field(10, ge=1)
    reinforce_sample_num: int = Field(8, ge=0, description="K: most REINFORCE rows per step")
    reg_prompt_fraction: float = Field(0.25, gt=0.0, le=1.0)
    positive_threshold: float = 0.05
    halve_above_target: bool = True
    # Which regulariser rows may become REINFORCE rows. "positives" (paper and reference code): those
    # with A_T > positive_threshold. "all" (a deviation, off by default): every row, the first k in
    # prompt order, whatever its reward -- reward-agnostic tempered REINFORCE, a pure entropy actuator
    # (aepo/num_positives then counts every tempered row: all are candidates).
    # "correct" (a deviation, off by default): every row whose reward exceeds correct_threshold, from
    # all-correct groups too. Near T = 1 most groups of an accurate policy are all-correct (A_T = 0),
    # so "positives" dries up exactly where the controller asks for a push down (measured: k = 0 at
    # T = 0.6); "correct" keeps k rows there without ever reinforcing a wrong answer.
    regulariser_samples: Literal["positives", "correct", "all"] = "positives"
    correct_threshold: float = Field(0.5, description="regulariser_samples == correct: rows with reward > this (verifiers score 0 / 1)")
    combine: Literal["replace", "add"] = "replace"
    alpha: float = Field(1.0, ge=0.0, description="REINFORCE weight when combine == add")
    # --- GRPO part ---
    advantage_scaling: Literal["group", "batch", "none"] = "group"
    clip_low: float = Field(0.2, ge=0.0)
    clip_high: float = Field(0.2, ge=0.0)
    dual_clip: float | None = Field(3.0, gt=1.0)
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "constant"] = "token_mean"
    loss_constant: float | None = Field(None, gt=0.0, description="normaliser for loss_agg == constant")
    kl_coef: float = Field(0.0, ge=0.0, description="k3 KL to the reference policy; 0 = off")
    # The engine's log-probs and the trainer's differ (vLLM's kernels, bf16): importance-weight the
    # policy rows' policy-gradient term by rho = pi_old / pi_rollout (aepo_core.core.losses.
    # rollout_correction_weights; TRL's vllm_importance_sampling_mode). none: the reference algorithm.
    rollout_correction: Literal["none", "token_truncate", "sequence_mask"] = "none"
    rollout_correction_cap: float = Field(3.0, gt=1.0, description="C: token ratios truncated at C, sequence ratios above C masked")
    # --- baselines ---
    entropy_coef: float = Field(0.03, ge=0.0, description="entropy_reg: loss - c * entropy")
    entropy_bonus_estimator: Literal["nll", "exact"] = "exact"
    entropy_adv_alpha: float = 0.4
    entropy_adv_kappa: float = Field(2.0, gt=0.0)
    adaptive_delta: float = Field(0.005, ge=0.0)
    adaptive_init_coef: float = Field(0.0, ge=0.0, le=1.0)
    # clip_cov / kl_cov (Cui et al., arXiv 2505.22617; verl's clip_cov_ratio / kl_cov_ratio): the
    # fraction of response tokens acted on (the paper: 2e-4 for Clip-Cov, 2e-3 for KL-Cov on 7B
    # models; at least one token per micro-batch), Clip-Cov's covariance window, KL-Cov's coefficient
    cov_fraction: float = Field(2e-4, gt=0.0, le=1.0)
    cov_low: float = 1.0
    cov_high: float = 5.0
    kl_cov_coef: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> AlgorithmConfig:
        if self.t_low > self.t_high:
            raise ValueError(f"t_low ({self.t_low}) must not exceed t_high ({self.t_high})")
        if not self.adaptive_t_min <= self.adaptive_t_init <= self.adaptive_t_max:
            raise ValueError(f"adaptive_t_init ({self.adaptive_t_init}) must lie in [adaptive_t_min, adaptive_t_max] "
                             f"= [{self.adaptive_t_min}, {self.adaptive_t_max}]")
        if self.adaptive_alpha_gain > 0 and (self.controller != "adaptive" or self.combine != "add"):
            raise ValueError("adaptive_alpha_gain > 0 moves the REINFORCE weight alpha: it needs controller 'adaptive' "
                             f"and combine 'add' (got controller {self.controller!r}, combine {self.combine!r})")
        if self.adaptive_integral_past_t_max and self.adaptive_alpha_gain <= 0:
            raise ValueError("adaptive_integral_past_t_max carries the integral into alpha's range: it needs "
                             "adaptive_alpha_gain > 0 (T alone has no range past adaptive_t_max)")
        if self.entropy_lookahead and self.entropy_rows != "policy":
            raise ValueError("entropy_lookahead reads the policy rows' entropy ahead: it needs entropy_rows 'policy'")
        if self.controller == "adaptive" and self.target_entropy <= 0:
            raise ValueError("controller 'adaptive' divides by target_entropy (relative error): set it above 0")
        if self.loss_agg == "constant" and self.loss_constant is None:
            raise ValueError("loss_agg 'constant' needs loss_constant (e.g. the max response length)")
        if self.cov_low >= self.cov_high:
            raise ValueError(f"cov_low ({self.cov_low}) must be below cov_high ({self.cov_high})")
        return self


class TrainerConfig(_Section):
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    mini_batches: int = Field(1, ge=1, description="optimizer steps per rollout (1 PPO epoch)")
    micro_batch_size: int | None = Field(None, ge=1, description="most rows per forward pass; None: no row cap")
    # micro-batches are built to this many (padded) tokens, rows sorted by length to cut padding
    # (aepo_core.core.update.split_micro); None: micro_batch_size rows in order (the whole mini-batch)
    max_tokens_per_micro_batch: int | None = Field(
        8192, ge=1, description="padded tokens (rows x longest row) per forward pass; None: row count only")
    grad_clip: float = Field(1.0, gt=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False
    logits_chunk: int = Field(1024, ge=1, description="sequence positions per chunk for log-probs/entropy")
    seed: int = 0
    # processes the update stage runs on (torchrun, FSDP2; aepo_core/pipeline/distributed.py): 1 is the
    # single-process update; N > 1 deals its micro-batches to N ranks (one GPU each, or CPU processes).
    # Execution only (EXECUTION_ONLY): the step equals the single-process one, so a run may resume
    # with another value
    nproc: int = Field(1, ge=1, description="update-stage processes (torchrun ranks, or Ray Train workers with run.ray_address); 1: in the flow's own process")


class EvaluationConfig(_Section):
    every: int = Field(5, ge=1, description="evaluate every N iterations and at the end")
    n: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(None, ge=1, description="None: rollout.max_new_tokens")
    num_prompts: int | None = Field(None, ge=1, description="None: the whole eval split")
    greedy: bool = False
    seed: int = 0


class TrackingConfig(_Section):
    mlflow_uri: str | None = None  # None: sqlite:///<runs_root>/mlflow.db
    experiment: str = "aepo"
    save_every: int = Field(10, ge=1, description="log the checkpoint as an MLflow artifact every N iterations")


class RunConfig(_Section):
    iterations: int = Field(30, ge=1)
    runs_root: str = "runs"
    name: str | None = None  # None: derived from algorithm and target
    # torch's intra-op threads (None: torch's default, the cores in this process's affinity mask).
    # Several runs on one machine: give each cores / runs, or their threads spin against each other
    threads: int | None = Field(None, ge=1, description="torch threads of this process (None: the cores it may use)")
    # where the stages on more than one process run (trainer.nproc, rollout.data_parallel > 1): None is
    # torchrun on this machine; a Ray cluster's address ("auto", "HOST:6379", "ray://HOST:10001") runs
    # the update under Ray Train's TorchTrainer and the rollout engines as Ray actors, on any of its
    # nodes (aepo_core/pipeline/ray_cluster.py). Execution only (EXECUTION_ONLY): the results are the same
    ray_address: str | None = Field(
        None, description="Ray cluster for the stages on N processes (None / null: torchrun on this machine)")

    @field_validator("ray_address")
    @classmethod
    def _no_empty_address(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("an empty address: give HOST:PORT, 'auto' or ray://HOST:PORT, or null for torchrun")
        return value
    # retention (aepo_core.pipeline.retention): what each update stage's outputs cost on disk
    keep_optimizer_states: int = Field(1, ge=1, description="optimiser states kept: the newest N updates' (resume needs 1)")
    keep_policies_every: int | None = Field(
        None, ge=1, description="keep the policy of every N-th iteration (None: tracking.save_every); the newest "
        "and the last are always kept")
    # the starting policy's held-out accuracy, measured once before the first update (base/evaluate,
    # MLflow step -1): the point every accuracy curve starts from
    evaluate_base: bool = Field(True, description="evaluate the starting policy once, before the first update")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check_distributed(self) -> Config:
        if self.trainer.nproc > 1 and self.algorithm.entropy_lookahead:
            raise ValueError("algorithm.entropy_lookahead is built and tested for one process: set trainer.nproc=1 "
                             "(the look-ahead moves the sharded parameters, which is not tested on N ranks)")
        # peft's adapters under FSDP2 would need the merge (W + BA) done on gathered weights and the
        # KL reference's disable_adapter() on a sharded model: not built, so refused rather than faked
        if self.trainer.nproc > 1 and self.model.lora.enabled:
            raise ValueError("trainer.nproc > 1 with model.lora.enabled is not supported yet: the distributed "
                             "update trains every weight; set trainer.nproc=1 for a LoRA run")
        return self

    @model_validator(mode="after")
    def _warn_inert_settings(self) -> Config:
        # KL-Cov penalises |log pi - log pi_old| on its tokens: with one optimiser step per rollout
        # the step is on-policy, the penalty is 0 and so is its gradient (sign(0) = 0), so the run is
        # plain GRPO (measured: the sweep's kl-cov-s0 equals grpo-s0 to every printed digit).
        if self.algorithm.name == "kl_cov" and self.trainer.mini_batches == 1:
            warnings.warn(
                "algorithm.name=kl_cov with trainer.mini_batches=1: every update step is on-policy, where "
                "KL-Cov's penalty |log pi - log pi_old| and its gradient are 0, so this trains plain GRPO; "
                "set trainer.mini_batches to 2 or more for KL-Cov to act",
                UserWarning,
                stacklevel=2,
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. {"algorithm.target_entropy": 0.5}; for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(f"{prefix}.{key}" if prefix else key, value)
            else:
                out[prefix] = node

        walk("", self.model_dump(mode="json"))
        return out


def _describe_errors(err: ValidationError, origin: str, overrides: list[tuple[str, str]] = ()) -> str:
    """One line per error, each naming its key and where the wrong value came from: the last
    override that set that key (or a key inside it), else the file (``origin``)."""
    lines, origins = [], []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        source = origin
        for dotted, text in overrides:
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                source = f"override '{text}'"
        origins.append(source)
        where = "" if not overrides else f" (from {source})"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{where}")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"key '{key}': {msg}{shown}{where}")
    if len(set(origins)) == 1:  # one source: name it once, as before
        lines = [line.replace(f" (from {origins[0]})", "") for line in lines]
        return f"invalid configuration in {origins[0]}:\n  " + "\n  ".join(lines)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'rollout.n=8' -> ('rollout.n', 8); the value is parsed as YAML (numbers, bools, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None), apply dotted overrides, validate."""
    tree: dict[str, Any] = {}
    origin = "the defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file (a YAML config is expected)") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    applied: list[tuple[str, str]] = []  # (dotted key, override text)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        applied.append((key, text))
    # validated once, after every override: keys that depend on each other (loss_agg=constant with
    # loss_constant=...) may be set in any order, by the file or the command line
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, origin, applied)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    from aepo_core.atomic import atomic_write_text

    atomic_write_text(path, cfg.to_yaml())


def with_execution_of(stored: Config, cfg: Config) -> Config:
    """`stored` with the execution-only keys (EXECUTION_ONLY) of `cfg`: what a resumed run continues
    with when it is asked to run differently (e.g. trainer.nproc=1 for a run started on 2)."""
    tree, values = stored.model_dump(mode="json"), cfg.flat()
    for key in EXECUTION_ONLY:
        _set_dotted(tree, key, values[key])
    return Config.model_validate(tree)


def override_changes(before: Config, after: Config, overrides: list[str]) -> dict[str, list[Any]]:
    """What applying `overrides` to `before` (giving `after`) sets: dotted key -> [value before,
    value after] (JSON values), for every key that changed and every key an override names, changed
    or not (it still says "from here on, this value": config_version)."""
    a, b = before.flat(), after.flat()
    named = [parse_override(text)[0] for text in overrides]
    return {
        key: [a.get(key), b.get(key)]
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key) or any(key == n or key.startswith(n + ".") for n in named)
    }


def config_version(latest: Config, records: list[dict[str, Any]], iteration: int | None) -> Config:
    """The config iteration `iteration` of a run is computed with, from the run's latest config and
    its change records (config_history.jsonl, oldest first).

    A record {"from_iteration": i, "changes": {key: [before, after]}} (written by a rerun with
    overrides) sets `key` to `after` for iterations >= i; earlier iterations keep what they were
    computed with. The latest config is every record applied, so the starting values are recovered by
    undoing the records newest first, and the config at `iteration` is those values with the
    records that reach it applied in order (a later record wins). Records without "changes" (runs
    written before versioning) are already in the latest config, for every iteration. The
    execution-only keys (EXECUTION_ONLY) are always the latest config's.

    Args:
        latest: the run's config.yaml. records: its history records. iteration: None for `latest`.
    Returns:
        A validated Config; `latest` itself when no record distinguishes `iteration`.
    """
    versioned = [r for r in records if r.get("changes")]
    if iteration is None or all(r.get("from_iteration", 0) <= iteration for r in versioned):
        return latest
    latest_values = latest.flat()
    values = dict(latest_values)
    for record in reversed(versioned):
        values.update({key: change[0] for key, change in record["changes"].items()})
    for record in versioned:
        if record.get("from_iteration", 0) <= iteration:
            values.update({key: change[1] for key, change in record["changes"].items()})
    # how a stage runs (EXECUTION_ONLY: processes) is the run's current choice for every iteration,
    # whatever a rerun recorded: a run resumed on 1 process must not launch 2 for older iterations
    values.update({key: latest_values[key] for key in EXECUTION_ONLY})
    tree: dict[str, Any] = {}
    for key, value in values.items():
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, f"the run's config at iteration {iteration}")) from None
