import copy
import math

import pytest
import torch
from conftest import VOCAB, tiny_qwen

from aepo_core.config import AlgorithmConfig, TrainerConfig
from aepo_core.core.aepo import ControllerState
from aepo_core.core.algorithms import make_algorithm
from aepo_core.core.batch import SequenceBatch
from aepo_core.core.entropy import exact_entropy, nll_entropy, shifted_logprobs_and_entropy
from aepo_core.core.losses import masked_mean
from aepo_core.core.update import (
    autocast_dtype,
    compute_logprobs,
    is_checkpointing,
    make_optimizer,
    split_in_order,
    split_micro,
    update_step,
)


def prepare_update_batch(policy, reg, cfg, state, group_size, regulariser_group_size=None):
    """The algorithm's batch preparation under the decision its controller makes from ``state``."""
    algo = make_algorithm(cfg)
    return algo.prepare_batch(policy, reg, algo.decide(state), group_size, regulariser_group_size)


def next_state(cfg, state, res):
    """The controller state after an update (the entropy stage's move, from the update's metrics)."""
    algo = make_algorithm(cfg)
    return algo.next_state(state, algo.decide(state), res.metrics)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _float32_by_default(monkeypatch):
    # these tests compare gradients and metrics to hand computations at 1e-6: trainer.dtype "auto"
    # must mean float32 here even on CPUs where it would pick bfloat16
    import aepo_core.core.update as update

    monkeypatch.setattr(update, "cpu_has_native_bf16", lambda: False)


def make_batch(responses, rewards, temperature=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (3,), generator=g).tolist() for _ in responses]
    return SequenceBatch.from_token_lists(
        prompts, responses, pad_id=0, rewards=rewards, temperatures=temperature
    )


# 4 prompts x 2 responses; response lengths 3,2,4,1,3,2,2,3 -> 20 response tokens
POLICY_RESPONSES = [[4, 5, 6], [7, 8], [9, 10, 11, 12], [13], [14, 15, 16], [17, 18], [19, 20], [21, 22, 23]]
POLICY_REWARDS = [1, 0, 1, 1, 0, 1, 0, 0]
# 2 prompts x 2 responses sampled at T; A_T = [+0.707, -0.707, -0.707, +0.707] -> POS = [0, 3]
REG_RESPONSES = [[24, 25], [26], [27, 28, 29], [30, 31, 3, 2]]
REG_REWARDS = [1, 0, 0, 1]


def policy_batch():
    return make_batch(POLICY_RESPONSES, POLICY_REWARDS, seed=1)


def reg_batch(temperature=1.2):
    return make_batch(REG_RESPONSES, REG_REWARDS, temperature, seed=2)


def step(algo, trainer, batch=None, reg=None, state=None, model=None, optimizer=None, **kw):
    """One ``update_step`` with the tests' defaults: the policy batch, no regulariser batch, the initial
    controller state, a fresh ``tiny_qwen()``, ``make_optimizer(model, trainer)``, groups of 2."""
    model = tiny_qwen() if model is None else model
    optimizer = make_optimizer(model, trainer) if optimizer is None else optimizer
    batch = policy_batch() if batch is None else batch
    state = ControllerState() if state is None else state
    return update_step(model, optimizer, batch, reg, algo, trainer, state, group_size=2, **kw)


def test_split_in_order():
    assert split_in_order(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert split_in_order(2, 4) == [range(0, 1), range(1, 2)]
    assert split_micro(range(3, 8), 2) == [range(3, 5), range(5, 7), range(7, 8)]
    assert split_micro(range(3, 8), None) == [range(3, 8)]


def test_split_micro_to_a_token_budget_by_hand():
    lengths = [5, 9, 3, 9, 4, 12]
    # sorted by length: rows 2 (3), 4 (4), 0 (5), 1 (9), 3 (9), 5 (12); packed while rows x longest <= 20
    assert split_micro(range(6), None, 20, lengths) == [[2, 4, 0], [1, 3], [5]]
    assert split_micro(range(6), 2, 20, lengths) == [[2, 4], [0, 1], [3], [5]]  # and at most 2 rows
    assert split_micro(range(3, 6), None, 20, lengths) == [[4, 3], [5]]  # a mini-batch's rows only
    assert split_micro(range(1), None, 20, [30]) == [[0]]  # a row over the budget is never dropped
    with pytest.raises(ValueError, match="lengths"):
        split_micro(range(6), None, 20)


def test_autocast_dtype_choice(monkeypatch):
    import aepo_core.core.update as update

    monkeypatch.setattr(update, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    monkeypatch.setattr(update, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(torch.device("cpu"), "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "float32") is None
    assert autocast_dtype(torch.device("cpu"), "bfloat16") is torch.bfloat16


def test_prepare_selects_positives_and_halves_above_target():
    cfg = AlgorithmConfig(name="aepo", reinforce_sample_num=8, target_entropy=0.5)
    below = prepare_update_batch(policy_batch(), reg_batch(), cfg, ControllerState(h_prev=0.2), group_size=2)
    # |POS| = 2, k = min(8, 2) = 2; X = POS + B[2:], 8 rows
    assert (below.num_positives, below.k) == (2, 2)
    assert below.batch.roles[:2] == ["reinforce", "reinforce"] and len(below.batch) == 8
    assert below.batch.source_index.tolist() == [0, 3, 2, 3, 4, 5, 6, 7]
    assert make_algorithm(cfg).decide(ControllerState(h_prev=0.2)).temperature == pytest.approx(1.2)
    above = prepare_update_batch(policy_batch(), reg_batch(), cfg, ControllerState(h_prev=0.9), group_size=2)
    # h_prev 0.9 > 0.5: k = 2 // 2 = 1
    assert (above.num_positives, above.k) == (2, 1)
    none_pos = prepare_update_batch(
        policy_batch(), make_batch(REG_RESPONSES, [1, 1, 0, 0], 1.2), cfg, ControllerState(), group_size=2
    )
    # all-equal groups: A_T = 0 everywhere, no positives, plain GRPO batch
    assert (none_pos.num_positives, none_pos.k) == (0, 0)
    assert none_pos.batch.roles == ["policy"] * 8
    # regulariser_samples "all": every tempered row is a candidate whatever its reward, first k in
    # prompt order (rows 0, 1, 2 of the 4, row 2 a wrong answer; K = 3 caps k at 3)
    every = cfg.model_copy(update={"regulariser_samples": "all", "reinforce_sample_num": 3})
    rows = prepare_update_batch(
        policy_batch(), make_batch(REG_RESPONSES, [1, 1, 0, 0], 1.2), every, ControllerState(h_prev=0.2), group_size=2
    )
    assert (rows.num_positives, rows.k) == (4, 3)
    assert rows.batch.roles[:3] == ["reinforce"] * 3 and rows.batch.source_index.tolist()[:3] == [0, 1, 2]
    # regulariser_samples "correct": the correct rows, the all-correct group's too (A_T = 0 there, so
    # "positives" found none above); never the wrong rows 2 and 3
    correct = cfg.model_copy(update={"regulariser_samples": "correct"})
    rows = prepare_update_batch(
        policy_batch(), make_batch(REG_RESPONSES, [1, 1, 0, 0], 1.2), correct, ControllerState(h_prev=0.2), group_size=2
    )
    assert (rows.num_positives, rows.k) == (2, 2)
    assert rows.batch.roles[:2] == ["reinforce"] * 2 and rows.batch.source_index.tolist()[:2] == [0, 1]


def test_reinforce_rows_land_in_first_mini_batch_with_ratio_exactly_one():
    algo = AlgorithmConfig(name="aepo", reinforce_sample_num=8)
    trainer = TrainerConfig(lr=5e-3, mini_batches=2, micro_batch_size=2)
    res = step(algo, trainer, reg=reg_batch())
    m = res.metrics
    assert m["aepo/k"] == 2 and m["aepo/num_positives"] == 2
    assert m["aepo/reinforce_in_first_mini_batch"] == 1.0
    # on-policy: old log-probs were recomputed with the same partition before any optimiser step
    assert m["aepo/reinforce_ratio_min"] == 1.0 and m["aepo/reinforce_ratio_max"] == 1.0
    # the second mini-batch is trained after one step, so some ratio must differ from 1
    assert m["actor/ratio_max"] > 1.0 or m["actor/ratio_min"] < 1.0
    assert m["actor/optimizer_steps"] == 2
    rows = res.rows
    assert [r["role"] for r in rows[:2]] == ["reinforce", "reinforce"]
    assert [(r["source"], r["source_index"], r["mini_batch"]) for r in rows[:2]] == [
        ("regulariser", 0, 0),
        ("regulariser", 3, 0),
    ]
    assert [r["advantage"] for r in rows[:2]] == [1.0, 1.0]
    assert [r["temperature"] for r in rows[:2]] == pytest.approx([1.2, 1.2])
    assert [r["source_index"] for r in rows[2:]] == [2, 3, 4, 5, 6, 7]
    assert [r["mini_batch"] for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    # the controller takes the measured nll entropy of the policy rows (entropy_rows "policy", the
    # default), or of every row with "all" (the reference code), and remembers T, k
    assert m["entropy/nll_policy_rows"] != m["entropy/nll"]  # the 2 tempered rows move the all-rows mean
    state = next_state(algo, ControllerState(), res)
    assert state.h_prev == m["entropy/nll_policy_rows"]
    assert next_state(algo.model_copy(update={"entropy_rows": "all"}), ControllerState(), res).h_prev == m["entropy/nll"]
    assert state.temperature == pytest.approx(1.2)
    assert state.k == 2 and state.step == 1


def test_entropy_metrics_match_a_separate_forward_pass():
    model = tiny_qwen()
    batch = policy_batch()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp, ent = shifted_logprobs_and_entropy(logits, batch.input_ids)
    algo = AlgorithmConfig(name="grpo", entropy_estimator="exact")
    trainer = TrainerConfig(lr=1e-3)
    res = step(algo, trainer, batch=batch, model=model)
    mask = batch.response_mask
    assert res.metrics["entropy/nll"] == pytest.approx(nll_entropy(logp, mask).item(), abs=1e-5)
    assert res.metrics["entropy/exact"] == pytest.approx(exact_entropy(ent, mask).item(), abs=1e-5)
    assert res.metrics["entropy/nll_policy_rows"] == res.metrics["entropy/nll"]  # no REINFORCE rows
    assert next_state(algo, ControllerState(), res).h_prev == res.metrics["entropy/exact"]  # the configured estimator
    # one mini-batch at ratio 1: loss = -sum_b A_b n_b / N with A = +-0.707107 (groups [1,0], [0,1]):
    # (-0.707107 * 3 + 0.707107 * 2 + 0.707107 * 3 - 0.707107 * 2) / 20 = 0 ; groups [1,1], [0,0] add 0
    assert res.metrics["loss/grpo"] == pytest.approx(0.0, abs=1e-6)
    assert res.metrics["actor/ratio_min"] == 1.0 and res.metrics["actor/ratio_max"] == 1.0


def test_add_mode_reinforce_loss_by_hand():
    algo = AlgorithmConfig(name="aepo", combine="add", alpha=0.5, reinforce_sample_num=8)
    trainer = TrainerConfig(lr=1e-3)
    res = step(algo, trainer, reg=reg_batch())
    # X = 2 REINFORCE rows (2 and 4 tokens) + all 8 policy rows (20 tokens), one micro-batch, ratio 1.
    # add mode: loss = J_GRPO + alpha * J_REINFORCE, each over its own tokens:
    #   reinforce = alpha * (-(1 * 6) / 6) = -0.5   (not the shared-denominator -0.5 * 6 / 26)
    #   grpo      = (-0.707107 * 3 + 0.707107 * 2 + 0.707107 * 3 - 0.707107 * 2) / 20 = 0
    assert res.metrics["batch/rows"] == 10
    assert res.metrics["loss/reinforce"] == pytest.approx(-0.5, abs=1e-6)
    assert res.metrics["loss/grpo"] == pytest.approx(0.0, abs=1e-6)
    assert res.metrics["loss/total"] == pytest.approx(-0.5, abs=1e-6)
    assert [r["weight"] for r in res.rows[:3]] == [0.5, 0.5, 1.0]


def _surrogate_loss(model, batch, adv):
    """-sum_b A_b * mean_t log p(token), the quantity a policy-gradient step decreases."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp, _ = shifted_logprobs_and_entropy(logits, batch.input_ids, with_entropy=False)
    mask = batch.response_mask
    row_mean = (logp * mask).sum(1) / mask.sum(1)
    return -(adv * row_mean).sum().item()


def test_overfit_fixed_batch_lowers_the_loss():
    model = tiny_qwen()
    batch = policy_batch()
    algo = AlgorithmConfig(name="grpo")
    trainer = TrainerConfig(lr=1e-2, mini_batches=2)
    opt = make_optimizer(model, trainer)
    # group advantages of POLICY_REWARDS: +-0.707107 in groups 0 and 2, 0 in groups 1 and 3
    adv = torch.tensor([0.707107, -0.707107, 0.0, 0.0, -0.707107, 0.707107, 0.0, 0.0])
    losses = [_surrogate_loss(model, batch, adv)]
    state = ControllerState()
    for _ in range(8):
        res = step(algo, trainer, batch=batch, state=state, model=model, optimizer=opt)
        state = next_state(algo, state, res)
        losses.append(_surrogate_loss(model, batch, adv))
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)) >= 6, losses
    assert math.isfinite(res.metrics["actor/grad_norm"])


def test_aepo_reinforce_rows_gain_probability():
    model = tiny_qwen()
    algo = AlgorithmConfig(name="aepo", reinforce_sample_num=8)
    trainer = TrainerConfig(lr=1e-2)
    opt = make_optimizer(model, trainer)
    reinforce_rows = reg_batch().select([0, 3])
    before = _surrogate_loss(model, reinforce_rows, torch.ones(2))
    state = ControllerState()
    for _ in range(3):
        res = step(algo, trainer, reg=reg_batch(), state=state, model=model, optimizer=opt)
        state = next_state(algo, state, res)
    # -mean log p of the REINFORCE rows falls
    assert _surrogate_loss(model, reinforce_rows, torch.ones(2)) < before - 0.5


def test_baseline_algorithms():
    batch = policy_batch()
    trainer = TrainerConfig(lr=1e-3)

    def run(algo, state=None, **kw):
        return step(algo, trainer, batch=batch, state=state, **kw)

    grpo = run(AlgorithmConfig(name="grpo"))
    adv = run(AlgorithmConfig(name="entropy_adv", entropy_adv_alpha=0.4, entropy_adv_kappa=2.0))
    # the bonus is capped at |A| / kappa: row 0 (A = 0.707107) becomes at most 0.707107 * 1.5
    assert adv.rows[0]["advantage"] == pytest.approx(0.707107 * 1.5, abs=1e-4)  # H_t ~ ln 32 >> cap
    assert adv.rows[1]["advantage"] == pytest.approx(-0.707107 * 0.5, abs=1e-4)
    assert adv.rows[2]["advantage"] == 0.0 and grpo.rows[0]["advantage"] == pytest.approx(0.707107, abs=1e-5)

    reg = run(AlgorithmConfig(name="entropy_reg", entropy_coef=0.03))
    # one micro-batch, token mean: bonus = -0.03 * exact entropy
    assert reg.metrics["loss/entropy_bonus"] == pytest.approx(-0.03 * reg.metrics["entropy/exact"], rel=1e-5)
    assert reg.metrics["loss/total"] == pytest.approx(
        reg.metrics["loss/grpo"] + reg.metrics["loss/entropy_bonus"], abs=1e-6
    )

    up_cfg = AlgorithmConfig(name="adaptive_entropy", target_entropy=100.0)
    down_cfg = AlgorithmConfig(name="adaptive_entropy", target_entropy=0.0)
    up = run(up_cfg, ControllerState(entropy_coef=0.5))
    down = run(down_cfg, ControllerState(entropy_coef=0.5))
    # entropy below 100 -> 0.5 + 0.005; above 0 -> 0.5 - 0.005
    assert next_state(up_cfg, ControllerState(entropy_coef=0.5), up).entropy_coef == pytest.approx(0.505)
    assert next_state(down_cfg, ControllerState(entropy_coef=0.5), down).entropy_coef == pytest.approx(0.495)
    assert up.metrics["entropy/bonus_coef"] == 0.5


def test_kl_to_reference_is_zero_on_policy_and_errors():
    model = tiny_qwen()
    ref = copy.deepcopy(model)
    trainer = TrainerConfig(lr=1e-3)
    algo = AlgorithmConfig(name="grpo", kl_coef=0.1)
    res = step(algo, trainer, model=model, ref_policy=ref)
    assert res.metrics["loss/kl"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        step(algo, trainer, model=model)
    with pytest.raises(ValueError):
        step(AlgorithmConfig(name="grpo"), trainer, reg=reg_batch(), model=model)


def test_gradient_checkpointing_and_bf16_autocast_run():
    model = tiny_qwen()
    trainer = TrainerConfig(
        lr=1e-3, gradient_checkpointing=True, dtype="bfloat16", micro_batch_size=3, logits_chunk=2
    )
    res = step(AlgorithmConfig(name="aepo"), trainer, reg=reg_batch(), model=model)
    assert is_checkpointing(model)
    assert all(math.isfinite(v) for v in res.metrics.values())
    assert res.metrics["entropy/nll"] > 0


# ---------------------------------------------------------------------------------------- review fixes
class GradRecorder(torch.optim.Optimizer):
    """An 'optimiser' that records the (clipped) gradients at each step and never moves the weights."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append(
            [
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for group in self.param_groups
                for p in group["params"]
            ]
        )


def _record_grads(model, batch, algo, trainer, reg=None, state=None, **kw):
    opt = GradRecorder(p for p in model.parameters() if p.requires_grad)
    res = step(algo, trainer, batch=batch, reg=reg, state=state, model=model, optimizer=opt, **kw)
    return opt.grads, res


def _forward_logp_entropy(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return shifted_logprobs_and_entropy(logits, batch.input_ids)


def _assert_grads_close(a, b, atol=1e-6):
    assert len(a) == len(b)
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-5)


def test_add_mode_gradient_is_grpo_plus_alpha_times_reinforce():
    model = tiny_qwen()
    algo = AlgorithmConfig(name="aepo", combine="add", alpha=0.5, reinforce_sample_num=8)
    trainer = TrainerConfig(grad_clip=1e9)
    grads, res = _record_grads(model, policy_batch(), algo, trainer, reg=reg_batch())
    # explicit loss: token mean of -A logp over the 20 GRPO tokens + 0.5 * token mean of -logp over
    # the 6 REINFORCE tokens (ratio 1: the gradient of -A r is that of -A logp)
    x = prepare_update_batch(policy_batch(), reg_batch(), algo, ControllerState(), group_size=2).batch
    logits = model(input_ids=x.input_ids, attention_mask=x.attention_mask).logits
    logp, _ = shifted_logprobs_and_entropy(logits, x.input_ids, with_entropy=False)
    reinf = torch.tensor([r == "reinforce" for r in x.roles]).float().unsqueeze(1)
    mask = x.response_mask
    grpo = -(x.advantages * logp * mask * (1 - reinf)).sum() / (mask * (1 - reinf)).sum()
    reinforce = -(logp * mask * reinf).sum() / (mask * reinf).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(grpo + 0.5 * reinforce, params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g for g, p in zip(expected, params, strict=True)]
    _assert_grads_close(grads[0], expected, atol=1e-5)
    assert res.metrics["loss/reinforce"] == pytest.approx(-0.5, abs=1e-6)


def test_dropout_model_first_mini_batch_ratio_exactly_one():
    model = tiny_qwen(attention_dropout=0.1)
    batch = policy_batch()
    # the dropout is live in train(): two forward passes differ
    model.train()
    a = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    b = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.equal(a, b)
    model.eval()
    trainer = TrainerConfig(lr=5e-3, mini_batches=2, micro_batch_size=2, gradient_checkpointing=True)
    res = step(
        AlgorithmConfig(name="aepo", reinforce_sample_num=8),
        trainer,
        batch=batch,
        reg=reg_batch(),
        model=model,
    )
    assert res.metrics["aepo/reinforce_ratio_min"] == 1.0 and res.metrics["aepo/reinforce_ratio_max"] == 1.0
    # one mini-batch: every ratio of the (only, on-policy) mini-batch is exactly 1
    trainer1 = TrainerConfig(lr=5e-3, mini_batches=1, micro_batch_size=3)
    res1 = step(AlgorithmConfig(name="grpo"), trainer1, batch=batch, model=model)
    assert res1.metrics["actor/ratio_min"] == 1.0 and res1.metrics["actor/ratio_max"] == 1.0
    # the dropout settings and the mode are restored
    assert not model.training
    assert all(layer.self_attn.attention_dropout == 0.1 for layer in model.model.layers)


def test_reinforce_rows_spilling_out_of_first_mini_batch_warn():
    trainer = TrainerConfig(lr=1e-3, mini_batches=8)  # first mini-batch: 1 row, k = 2
    with pytest.warns(UserWarning, match=r"2 REINFORCE rows .* only 1 of the 8 rows.*1 REINFORCE rows"):
        res = step(AlgorithmConfig(name="aepo", reinforce_sample_num=8), trainer, reg=reg_batch())
    assert res.metrics["aepo/k"] == 2
    assert res.metrics["aepo/reinforce_in_first_mini_batch"] == 0.0


def test_empty_micro_batches_are_skipped_in_the_averages():
    model = tiny_qwen()
    responses = [[4, 5, 6], [7, 8], [], [], [14, 15, 16, 9], [17]]
    batch = make_batch(responses, [1, 0, 1, 1, 0, 1], seed=3)
    logp, ent = _forward_logp_entropy(model, batch)
    mask = batch.response_mask
    # micro-batch [2:4] has no response token: skipped, and the metrics are the token means of all
    nll = nll_entropy(logp, mask).item()
    exact = exact_entropy(ent, mask).item()
    trainer = TrainerConfig(lr=1e-3, micro_batch_size=2)
    res = step(AlgorithmConfig(name="grpo"), trainer, batch=batch, model=model)
    assert res.metrics["entropy/nll"] == pytest.approx(nll, abs=1e-5)
    assert res.metrics["entropy/exact"] == pytest.approx(exact, abs=1e-5)
    assert next_state(AlgorithmConfig(name="grpo"), ControllerState(), res).h_prev == res.metrics["entropy/nll"]
    assert [r["response_tokens"] for r in res.rows] == [3, 2, 0, 0, 4, 1]
    assert [r["mini_batch"] for r in res.rows] == [0] * 6


def test_old_logprobs_of_tempered_rows_are_recomputed_at_temperature_one():
    model = tiny_qwen()
    batch = reg_batch(temperature=1.2)
    old, _ = compute_logprobs(model, batch, [[range(0, 2), range(2, 4)]], chunk=2)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.input_ids[:, 1:].unsqueeze(-1)
    at_one = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels).squeeze(-1)
    at_t = torch.log_softmax(logits[:, :-1].float() / 1.2, -1).gather(-1, labels).squeeze(-1)
    m = batch.response_mask[:, 1:].bool()
    torch.testing.assert_close(old[:, 1:][m], at_one[m], atol=1e-5, rtol=1e-5)
    assert (old[:, 1:][m] - at_t[m]).abs().max() > 1e-2


def test_gradient_accumulation_matches_one_micro_batch_for_equal_micro_batches():
    # every row: 3 prompt + 3 response tokens, so equal-size micro-batches hold equal token counts
    responses = [[4 + i, 5 + i, 6 + i] for i in range(8)]
    batch = make_batch(responses, POLICY_REWARDS, seed=4)
    grads = {}
    for micro in (None, 4, 2):
        trainer = TrainerConfig(grad_clip=1e9, micro_batch_size=micro)
        grads[micro], _ = _record_grads(tiny_qwen(), batch, AlgorithmConfig(name="grpo"), trainer)
    assert any(g.abs().max() > 0 for g in grads[None][0])
    _assert_grads_close(grads[4][0], grads[None][0])
    _assert_grads_close(grads[2][0], grads[None][0])


def test_h_prev_is_the_token_mean_nll_over_the_whole_batch_not_a_mean_of_micro_batch_means():
    model = tiny_qwen()
    batch = policy_batch()
    logp, ent = _forward_logp_entropy(model, batch)
    mask = batch.response_mask
    # micro-batches [0:5] (3+2+4+1+3 = 13 tokens) and [5:8] (2+2+3 = 7 tokens)
    per_micro = [nll_entropy(logp[s], mask[s]).item() for s in (slice(0, 5), slice(5, 8))]
    mean_of_means = sum(per_micro) / 2
    token_mean = (13 * per_micro[0] + 7 * per_micro[1]) / 20
    assert token_mean == pytest.approx(nll_entropy(logp, mask).item(), abs=1e-6)
    assert abs(mean_of_means - token_mean) > 1e-4  # the two definitions differ on this batch
    trainer = TrainerConfig(lr=1e-3, micro_batch_size=5)
    res = step(AlgorithmConfig(name="aepo"), trainer, batch=batch, model=model)
    assert res.metrics["entropy/nll"] == pytest.approx(token_mean, abs=1e-5)
    assert res.metrics["entropy/exact"] == pytest.approx(exact_entropy(ent, mask).item(), abs=1e-5)
    assert next_state(AlgorithmConfig(name="aepo"), ControllerState(), res).h_prev == pytest.approx(token_mean, abs=1e-5)


# issue 12 case 6: 2 prompts x 2 samples, rewards 1, 0, 1, 0, response lengths 2, 2, 12, 12
UNEVEN_RESPONSES = [[4, 5], [6, 7], list(range(8, 20)), list(range(20, 32))]


@pytest.mark.parametrize(
    "algo",
    [
        AlgorithmConfig(name="grpo"),
        AlgorithmConfig(name="grpo", loss_agg="seq_mean_token_mean"),
        AlgorithmConfig(name="grpo", loss_agg="constant", loss_constant=16.0),
        AlgorithmConfig(name="entropy_reg", entropy_bonus_estimator="nll"),
        AlgorithmConfig(name="aepo", combine="add", alpha=0.5, reinforce_sample_num=2),
    ],
    ids=["token_mean", "seq_mean_token_mean", "constant", "entropy_reg_nll", "aepo_add"],
)
def test_step_does_not_depend_on_the_micro_batch_partition(algo):
    batch = make_batch(UNEVEN_RESPONSES, [1, 0, 1, 0], seed=5)
    reg = make_batch([[4, 5, 6], [7], [8, 9], list(range(10, 19))], [1, 0, 0, 1], 1.2, seed=6)
    if algo.name != "aepo":
        reg = None
    grads, steps, metrics = {}, {}, {}
    # rows per micro-batch (in order), or a token budget (rows sorted by length, packed)
    partitions = {None: {}, 1: {"micro_batch_size": 1}, 2: {"micro_batch_size": 2}, 3: {"micro_batch_size": 3},
                  "tokens 24": {"max_tokens_per_micro_batch": 24}, "tokens 48": {"max_tokens_per_micro_batch": 48}}
    for micro, how in partitions.items():
        trainer = TrainerConfig(lr=1e-2, grad_clip=1e9, **{"max_tokens_per_micro_batch": None, **how})
        grads[micro], res = _record_grads(tiny_qwen(), batch, algo, trainer, reg=reg)
        model = tiny_qwen()
        before = [p.detach().clone() for p in model.parameters()]
        step(algo, trainer, batch=batch, reg=reg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
        steps[micro] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
        metrics[micro] = res.metrics
    assert steps[None].norm() > 0
    for micro in list(partitions)[1:]:
        _assert_grads_close(grads[micro][0], grads[None][0])
        torch.testing.assert_close(steps[micro], steps[None], atol=1e-6, rtol=1e-5)
        for key in ("entropy/nll", "entropy/exact", "loss/total", "actor/clip_frac", "entropy/nll_policy_rows"):
            assert metrics[micro][key] == pytest.approx(metrics[None][key], abs=1e-6), key


def test_uneven_micro_batches_by_hand():
    """The normaliser counts add up over a partition, whatever it is (hand values)."""
    from aepo_core.core.losses import loss_normaliser, loss_sum

    batch = make_batch(UNEVEN_RESPONSES, [1, 0, 1, 0], seed=5)
    mask = batch.response_mask  # 2, 2, 12, 12 response tokens
    assert loss_normaliser(mask, "token_mean") == 28.0
    assert loss_normaliser(mask[:2], "token_mean") + loss_normaliser(mask[2:], "token_mean") == 28.0
    assert loss_normaliser(mask, "seq_mean_token_mean") == 4.0
    assert loss_normaliser(mask, "constant", 16.0) == 64.0
    # per-token values 1 on rows 0-1 and 3 on rows 2-3: the token mean is (4 * 1 + 24 * 3) / 28, the
    # old mean of micro-batch means ([0:2], [2:4]) was (1 + 3) / 2 = 2
    values = torch.tensor([1.0, 1.0, 3.0, 3.0]).unsqueeze(1).expand_as(mask).clone()
    parts = [loss_sum(values[s], mask[s]) / 28.0 for s in (slice(0, 2), slice(2, 4))]
    assert sum(parts).item() == pytest.approx(76 / 28)
    seq = [loss_sum(values[s], mask[s], "seq_mean_token_mean") / 4.0 for s in (slice(0, 1), slice(1, 4))]
    assert sum(seq).item() == pytest.approx(2.0)  # rows 1, 1, 3, 3 -> mean 2


def test_policy_rows_are_scored_at_their_sampling_temperature():
    """Issue 12 case 7: rows sampled at T = 0.5 get old log-probs, ratio and clip at T = 0.5."""
    from aepo_core.core.update import scoring_temperatures

    model = tiny_qwen()
    batch = make_batch(POLICY_RESPONSES, POLICY_REWARDS, temperature=0.5, seed=1)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.input_ids[:, 1:].unsqueeze(-1)
    at_half = torch.log_softmax(logits[:, :-1].float() / 0.5, -1).gather(-1, labels).squeeze(-1)
    at_one = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels).squeeze(-1)
    m = batch.response_mask[:, 1:].bool()
    temps = scoring_temperatures(batch)
    torch.testing.assert_close(temps, torch.full((8,), 0.5))
    old, _ = compute_logprobs(model, batch, [[range(0, 8)]], chunk=2, temperatures=temps)
    torch.testing.assert_close(old[:, 1:][m], at_half[m], atol=1e-5, rtol=1e-5)
    assert (old[:, 1:][m] - at_one[m]).abs().max() > 1e-2
    # the update: both the one-pass (own detached log-probs) and the two-pass paths have ratio 1
    for recompute in (False, True):
        trainer = TrainerConfig(lr=1e-3, micro_batch_size=3)
        res = step(AlgorithmConfig(name="grpo"), trainer, batch=batch, recompute_old_logprobs=recompute)
        assert res.metrics["actor/ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert res.metrics["actor/ratio_min"] == pytest.approx(1.0, abs=1e-6)
        # the entropy the controller reads stays at T = 1
        assert res.metrics["entropy/nll"] == pytest.approx(masked_mean(-at_one, batch.response_mask[:, 1:]).item(), abs=1e-5)


def test_scoring_temperatures_rule():
    from aepo_core.core.aepo import assemble_batch
    from aepo_core.core.update import scoring_temperatures

    policy = make_batch(POLICY_RESPONSES, POLICY_REWARDS, temperature=0.7, seed=1)
    policy = policy.with_fields(advantages=torch.zeros_like(policy.response_mask, dtype=torch.float32))
    reg = reg_batch(temperature=1.3)
    x = assemble_batch(policy, reg, torch.tensor([0, 3]), 2)
    temps = scoring_temperatures(x)
    # REINFORCE rows (first) at T = 1, policy rows at their sampling temperature
    assert [r == "reinforce" for r in x.roles][:2] == [True, True]
    torch.testing.assert_close(temps[:2], torch.ones(2))
    assert temps[2:].tolist() == pytest.approx([0.7] * (len(x) - 2))
    assert scoring_temperatures(policy_batch()) is None  # all at T = 1: no rescaling at all
    with pytest.raises(ValueError, match="rollout.temperature"):
        scoring_temperatures(make_batch(POLICY_RESPONSES, POLICY_REWARDS, temperature=0.0))


def test_regulariser_advantages_use_their_own_group_size():
    cfg = AlgorithmConfig(name="aepo", reinforce_sample_num=8)
    reg = make_batch(REG_RESPONSES, [1, 1, 0, 1], 1.2, seed=2)
    # one group of 4: mean 0.75, A_T = [+0.5, +0.5, -1.5, +0.5] -> POS = [0, 1, 3]
    four = prepare_update_batch(
        policy_batch(), reg, cfg, ControllerState(), group_size=2, regulariser_group_size=4
    )
    assert (four.num_positives, four.k) == (3, 3)
    assert four.batch.source_index[:3].tolist() == [0, 1, 3]
    # groups of 2 ([1, 1] all equal, [0, 1]): POS = [3] only
    two = prepare_update_batch(policy_batch(), reg, cfg, ControllerState(), group_size=2)
    assert (two.num_positives, two.k) == (1, 1)
    trainer = TrainerConfig(lr=1e-3)
    res = step(cfg, trainer, reg=reg, regulariser_group_size=4)
    assert res.metrics["aepo/num_positives"] == 3 and res.metrics["aepo/k"] == 3
    assert [r["source_index"] for r in res.rows[:3]] == [0, 1, 3]


def test_entropy_adv_uncapped_branch_uses_pi_old_entropy():
    model = tiny_qwen()
    batch = policy_batch()
    _, ent_old = _forward_logp_entropy(model, batch)
    mask = batch.response_mask
    alpha = 0.01
    row_h = (ent_old * mask).sum(1) / mask.sum(1)
    adv = [0.707107, -0.707107, 0.0, 0.0, -0.707107, 0.707107, 0.0, 0.0]
    # alpha * H (~0.035) < |A| / kappa (0.354): the min picks alpha * H, not the cap
    assert (alpha * ent_old[mask.bool()]).max() < 0.707107 / 2
    trainer = TrainerConfig(lr=5e-2, mini_batches=2)
    res = step(
        AlgorithmConfig(name="entropy_adv", entropy_adv_alpha=alpha, entropy_adv_kappa=2.0),
        trainer,
        batch=batch,
        model=model,
    )
    for i in (0, 1, 4, 5):  # rows 4, 5 are trained after the first step, still shaped with pi_old's H
        assert res.rows[i]["advantage"] == pytest.approx(adv[i] + alpha * row_h[i].item(), abs=1e-5)
    assert res.rows[2]["advantage"] == 0.0  # min(alpha * H, 0) = 0
    _, ent_new = _forward_logp_entropy(model, batch)
    assert (ent_new - ent_old).abs().max() > 1e-3  # the policy moved: pi_old's H is not the current one


@pytest.mark.parametrize("estimator", ["nll", "exact"])
def test_entropy_reg_bonus_changes_the_gradient(estimator):
    batch = policy_batch()
    trainer = TrainerConfig(grad_clip=1e9)
    c = 0.03

    def algo(coef):
        return AlgorithmConfig(name="entropy_reg", entropy_coef=coef, entropy_bonus_estimator=estimator)

    g0, _ = _record_grads(tiny_qwen(), batch, algo(0.0), trainer)
    gc, res = _record_grads(tiny_qwen(), batch, algo(c), trainer)
    diff = [a - b for a, b in zip(gc[0], g0[0], strict=True)]
    assert max(d.abs().max().item() for d in diff) > 1e-5
    # the difference is the gradient of -c * H with the configured estimator: the full-vocabulary
    # entropy, or for nll the score-function surrogate (-logp).detach() * logp (E[grad] = grad H)
    model = tiny_qwen()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp, ent = shifted_logprobs_and_entropy(logits, batch.input_ids)
    mask = batch.response_mask
    h = masked_mean(ent, mask) if estimator == "exact" else masked_mean((-logp).detach() * logp, mask)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(-c * h, params, allow_unused=True)
    expected = [torch.zeros_like(p) if g is None else g for g, p in zip(expected, params, strict=True)]
    _assert_grads_close(diff, expected, atol=1e-6)
    # the logged bonus is -c times the entropy value, not the surrogate's value
    assert res.metrics["loss/entropy_bonus"] == pytest.approx(
        -c * res.metrics[f"entropy/{estimator}"], rel=1e-5
    )


@pytest.mark.parametrize("micro", [None, 3])
def test_single_mini_batch_skips_the_old_logprob_pass_without_changing_the_step(micro, monkeypatch):
    # one mini-batch is exactly on-policy: reusing the training pass's detached log-probs as pi_old
    # must give the same gradient and metrics as the separate no-grad pass
    import aepo_core.core.update as update

    algo = AlgorithmConfig(name="aepo", reinforce_sample_num=8)
    trainer = TrainerConfig(grad_clip=1e9, micro_batch_size=micro)
    passes = []
    counting = lambda *a, **kw: passes.append(1) or compute_logprobs(*a, **kw)  # noqa: E731
    monkeypatch.setattr(update, "compute_logprobs", counting)
    runs = {}
    for recompute in (True, None):
        runs[recompute] = _record_grads(
            tiny_qwen(), policy_batch(), algo, trainer, reg=reg_batch(), recompute_old_logprobs=recompute
        )
    assert len(passes) == 1  # the default skipped the extra pass; True ran it
    _assert_grads_close(runs[None][0][0], runs[True][0][0])
    for key in ("loss/total", "entropy/nll", "actor/clip_frac", "actor/approx_kl", "aepo/reinforce_ratio_max"):
        assert runs[None][1].metrics[key] == pytest.approx(runs[True][1].metrics[key], abs=1e-6)
    assert runs[None][1].metrics["aepo/reinforce_ratio_max"] == 1.0


def test_rollout_mismatch_is_measured_and_corrected_only_when_the_log_probs_differ():
    """The policy rows' engine log-probs against pi_old's: identical ones measure 0 and leave every
    correction without effect; log-probs all 0.3 nats above the trainer's measure 0.3, weigh each
    token e^-0.3 under token truncation (the policy gradient scales by it) and keep every row
    under sequence masking (their ratio e^(-0.3 * len) is below the cap)."""
    from aepo_core.core.update import scoring_temperatures

    model = tiny_qwen()
    batch = policy_batch()
    old, _ = compute_logprobs(model, batch, [[range(0, 8)]], chunk=2, temperatures=scoring_temperatures(batch))
    trainer = TrainerConfig(lr=1e-3, micro_batch_size=3)

    def run(rollout_logprobs, mode):
        m = copy.deepcopy(model)
        res = step(AlgorithmConfig(name="grpo", rollout_correction=mode), trainer, model=m,
                   batch=batch.with_fields(rollout_logprobs=rollout_logprobs * batch.response_mask))
        return res.metrics, [p.detach().clone() for p in m.parameters()]

    plain, plain_weights = run(old, "none")
    assert plain["mismatch/mean_abs_logp"] < 1e-5 and plain["mismatch/k3"] < 1e-9
    assert plain["mismatch/corrected_fraction"] == 0.0
    for mode in ("token_truncate", "sequence_mask"):
        metrics, weights = run(old, mode)
        assert metrics["actor/grad_norm"] == pytest.approx(plain["actor/grad_norm"], rel=1e-5), mode
        for a, b in zip(weights, plain_weights, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0), mode
    shifted, _ = run(old + 0.3, "none")
    assert shifted["mismatch/mean_abs_logp"] == pytest.approx(0.3, abs=1e-5)
    assert shifted["mismatch/max_abs_logp"] == pytest.approx(0.3, abs=1e-5)
    assert shifted["mismatch/k3"] == pytest.approx(math.exp(-0.3) + 0.3 - 1, abs=1e-6)
    truncated, _ = run(old + 0.3, "token_truncate")
    assert truncated["mismatch/corrected_fraction"] == 1.0
    assert shifted["actor/grad_norm"] > 1e-3  # (the GRPO loss itself is 0 at ratio 1: advantages sum to 0)
    assert truncated["actor/grad_norm"] == pytest.approx(math.exp(-0.3) * shifted["actor/grad_norm"], rel=1e-5)
    masked, _ = run(old + 0.3, "sequence_mask")
    assert masked["mismatch/corrected_fraction"] == 0.0
    assert masked["actor/grad_norm"] == pytest.approx(shifted["actor/grad_norm"], rel=1e-6)
    # without engine log-probs (a batch built by hand) nothing is measured
    assert not [k for k in step(AlgorithmConfig(name="grpo"), trainer).metrics if k.startswith("mismatch/")]


def test_the_controllers_alpha_weights_the_reinforce_rows():
    """The adaptive controller's second actuator sets the "add"-mode weight of the REINFORCE rows
    (Decision.alpha); without it they carry algorithm.alpha."""
    cfg = AlgorithmConfig(name="aepo", controller="adaptive", combine="add", alpha=0.5, target_entropy=0.2,
                          adaptive_t_min=0.8, adaptive_t_max=1.5, adaptive_alpha_gain=4.0, adaptive_alpha_max=3.0)
    # u = 1.45 + (0.2 - 0.1) / 0.2 = 1.95: T 1.5, alpha 0.5 * (1 + 4 * 0.45) = 1.4
    state = ControllerState(h_prev=0.1, adaptive_t=1.45, step=3)
    prepared = prepare_update_batch(policy_batch(), reg_batch(1.5), cfg, state, group_size=2)
    assert prepared.k == 2 and prepared.batch.weights[:2].tolist() == pytest.approx([1.4, 1.4])
    assert prepared.batch.weights[2:].tolist() == [1.0] * 8
    plain = cfg.model_copy(update={"adaptive_alpha_gain": 0.0})
    prepared = prepare_update_batch(policy_batch(), reg_batch(1.5), plain, state, group_size=2)
    assert prepared.batch.weights[:2].tolist() == [0.5, 0.5]
