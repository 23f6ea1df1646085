"""Every value the config schema accepts runs (issue 12, case 9): each algorithm and each option that
changes a code path trains one tiny iteration end to end through the six stage functions, on the
real base policy, and leaves finite metrics; options that cannot work are refused at load time."""

from __future__ import annotations

import math

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from aepo_core.config import ConfigError, load_config
from aepo_core.pipeline import stages
from aepo_core.pipeline.stages import STAGES

OPTIONS = {
    "grpo": ["algorithm.name=grpo"],
    "aepo": ["algorithm.name=aepo"],
    "entropy_reg": ["algorithm.name=entropy_reg"],
    "entropy_reg_nll": ["algorithm.name=entropy_reg", "algorithm.entropy_bonus_estimator=nll"],
    "entropy_adv": ["algorithm.name=entropy_adv"],
    "adaptive_entropy": ["algorithm.name=adaptive_entropy", "algorithm.adaptive_init_coef=0.01"],
    "clip_cov": ["algorithm.name=clip_cov", "algorithm.cov_fraction=0.05", "algorithm.cov_low=0.0"],
    "kl_cov": ["algorithm.name=kl_cov", "algorithm.cov_fraction=0.05"],
    "aepo_add": ["algorithm.combine=add", "algorithm.alpha=0.5"],
    "seq_mean_token_mean": ["algorithm.loss_agg=seq_mean_token_mean"],
    "constant": ["algorithm.loss_agg=constant", "algorithm.loss_constant=24"],
    "kl": ["algorithm.name=grpo", "algorithm.kl_coef=0.05"],
    "aepo_kl": ["algorithm.kl_coef=0.05"],
    "controller_fixed": ["algorithm.controller=fixed"],
    "controller_adaptive": ["algorithm.controller=adaptive"],
    "entropy_rows_all": ["algorithm.entropy_rows=all"],
    "regulariser_samples_all": ["algorithm.regulariser_samples=all"],
    "estimator_exact": ["algorithm.entropy_estimator=exact"],
    "mini_batches": ["trainer.mini_batches=2"],
    "micro_batch_size": ["trainer.micro_batch_size=3"],
    "rollout_temperature": ["rollout.temperature=0.5"],
    "top_p": ["rollout.top_p=0.9"],
    "eval_greedy": ["evaluation.greedy=true"],
    "advantage_batch": ["algorithm.advantage_scaling=batch"],
    "advantage_none": ["algorithm.advantage_scaling=none"],
    "no_dual_clip": ["algorithm.dual_clip=null"],
    "no_halving": ["algorithm.halve_above_target=false"],
    "checkpointing_bf16": ["trainer.gradient_checkpointing=true", "trainer.dtype=bfloat16"],
}


def _overrides(base_policy_dir, root, extra):
    return [
        f"model.path={base_policy_dir}",
        f"run.runs_root={root}",
        "run.iterations=1",
        "data.synthetic.n_train=64",
        "data.synthetic.n_eval=8",
        "rollout.prompts_per_batch=4",
        "rollout.n=3",
        "rollout.max_new_tokens=32",
        "algorithm.reinforce_sample_num=2",
        "algorithm.reg_prompt_fraction=0.5",
        "trainer.lr=1e-4",
        "evaluation.n=2",
        "evaluation.num_prompts=4",
        *extra,
    ]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_trains_one_iteration(name, base_policy_dir, tmp_path):
    cfg = load_config(None, _overrides(base_policy_dir, tmp_path, OPTIONS[name]))
    run = stages.init_run(cfg, log=None)
    for stage in STAGES:
        stages.PIPELINE[stage].run(run, 0)
        assert stages.is_stage_complete(run, cfg, 0, stage), stage
    update = run.manifest(0, "update")["metrics"]
    for key in ("loss/total", "entropy/nll", "entropy/exact", "actor/grad_norm", "controller/h_prev_in"):
        assert math.isfinite(update[key]), (key, update[key])
    assert update["actor/optimizer_steps"] == cfg.trainer.mini_batches
    assert update["entropy/nll"] > 0
    # a gradient wherever there is a learning signal: a group with mixed rewards, or REINFORCE rows
    # (at T = 0.5 or top-p 0.9 an accurate base can answer every prompt right: all advantages 0)
    signal = run.manifest(0, "reward")["metrics"]["mixed_group_fraction"] > 0 or update.get("aepo/k", 0) > 0
    assert update["actor/grad_norm"] > 0 or not signal
    evaluation = run.manifest(0, "evaluate")["metrics"]
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    if cfg.algorithm.kl_coef > 0:
        # the reference is the starting policy, and the only step is on-policy: KL exactly 0
        assert update["loss/kl"] == pytest.approx(0.0, abs=1e-6)
    if cfg.trainer.mini_batches == 1 and cfg.trainer.dtype != "bfloat16":
        # one on-policy mini-batch: ratio exactly 1 on every row, whatever the sampling temperature
        assert update["actor/ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert update["actor/ratio_min"] == pytest.approx(1.0, abs=1e-6)
    if cfg.algorithm.name in ("clip_cov", "kl_cov"):
        # the covariance selection acted on about cov_fraction of the tokens (at least one)
        assert 0 < update["actor/cov_selected_frac"] <= 0.05 + 1e-6
    if name == "rollout_temperature":
        _engine_logprobs_equal_the_updates(run, cfg)


def _engine_logprobs_equal_the_updates(run, cfg):
    """Sampled at T = 0.5: the engine's log-probs are the update's old log-probs (issue 12, case 7)."""
    from aepo_core.core.batch import SequenceBatch
    from aepo_core.core.update import compute_logprobs, scoring_temperatures
    from aepo_core.io.models import load_policy

    rows = pq.read_table(run.stage_dir(0, "rollout") / "rollouts.parquet")
    policy = rows.filter(pc.equal(rows["batch"], "policy"))
    assert set(policy.column("temperature").to_pylist()) == {0.5}
    batch = SequenceBatch.from_token_lists(
        policy.column("prompt_token_ids").to_pylist(), policy.column("token_ids").to_pylist(), 0,
        temperatures=policy.column("temperature").to_pylist(),
    )
    model = load_policy(stages.policy_dir(run, 0))
    old, _ = compute_logprobs(model, batch, [[range(len(batch))]], chunk=64, temperatures=scoring_temperatures(batch))
    mask = batch.response_mask.bool()
    engine = torch.cat([torch.tensor(lp) for lp in policy.column("logprobs").to_pylist()])
    assert old[mask].shape == engine.shape
    assert (old[mask] - engine).abs().max().item() < 1e-4
    # and they are not the T = 1 values
    at_one, _ = compute_logprobs(model, batch, [[range(len(batch))]], chunk=64)
    assert (at_one[mask] - engine).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.temperature=0", "rollout.temperature"),
        ("algorithm.loss_agg=constant", "loss_constant"),
        ("algorithm.t_low=2.0", "t_low"),
    ],
)
def test_options_that_cannot_work_are_refused_at_load(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_dependent_overrides_may_come_in_any_order():
    a = load_config(None, ["algorithm.loss_agg=constant", "algorithm.loss_constant=24"])
    b = load_config(None, ["algorithm.loss_constant=24", "algorithm.loss_agg=constant"])
    assert a == b and a.algorithm.loss_constant == 24.0
    with pytest.raises(ConfigError, match=r"override 'rollout.n=0'"):
        load_config(None, ["rollout.n=0", "algorithm.loss_constant=24"])


def test_kl_reference_is_the_frozen_starting_policy(base_policy_dir, tmp_path):
    cfg = load_config(None, _overrides(base_policy_dir, tmp_path, ["algorithm.kl_coef=0.05", "run.iterations=2"]))
    run = stages.init_run(cfg, log=None)
    for i in range(2):
        for stage in ("prepare", "rollout", "reward", "update", "entropy"):
            stages.PIPELINE[stage].run(run, i)
    assert run.manifest(0, "update")["metrics"]["loss/kl"] == pytest.approx(0.0, abs=1e-6)
    # iteration 1 samples from the updated policy: it has moved away from the reference
    assert run.manifest(1, "update")["metrics"]["loss/kl"] > 0
    device = torch.device("cpu")
    ref = stages.reference_policy(stages.policy_dir(run, 0), device)
    assert ref is stages.reference_policy(stages.policy_dir(run, 0), device)  # loaded once
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    from aepo_core.io.models import load_policy

    base = load_policy(stages.policy_dir(run, 0))
    for (name, a), b in zip(ref.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # never trained


def test_settings_this_machine_cannot_run_are_refused_at_start(tmp_path, monkeypatch):
    from aepo_core.errors import UserError
    from aepo_core.pipeline.stages import check_start

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="trainer.device=cuda"):
        check_start(None, tmp_path / "r", overrides=["trainer.device=cuda"])
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(UserError, match="rollout.engine=vllm"):
            check_start(None, tmp_path / "r", overrides=["rollout.engine=vllm"])
    assert not (tmp_path / "r").exists()
