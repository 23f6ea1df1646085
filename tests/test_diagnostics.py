"""`aepo entropy-push` (aepo_core/pipeline/diagnostics.py): the entropy gradient, the parts' gradients,
the first-order prediction against a real step, the update's weighting, and the command end to end."""

from __future__ import annotations

import json
import math
import zlib
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, tiny_qwen
from typer.testing import CliRunner

from aepo_core.cli import app
from aepo_core.config import Config, save_config
from aepo_core.core.batch import SequenceBatch
from aepo_core.io.models import write_policy
from aepo_core.io.verifiers import Judgement
from aepo_core.pipeline import diagnostics
from aepo_core.pipeline.diagnostics import (
    first_order_change,
    grpo_gradient,
    mean_se,
    probe_entropy_gradient,
    ratio_se,
    reinforce_gradient,
    trainable,
    update_weight,
)


class Bigram(torch.nn.Module):
    """logits at position t = table[token t]: a linear softmax model whose entropy gradient is known."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def _batch(rows, vocab, seed=0, rewards=None, temperature=1.0, prompt=3, response=(2, 6)):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (prompt,), generator=g).tolist() for _ in range(rows)]
    lengths = torch.randint(response[0], response[1] + 1, (rows,), generator=g).tolist()
    responses = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    return SequenceBatch.from_token_lists(prompts, responses, 0, rewards=rewards, temperatures=temperature)


def test_probe_entropy_gradient_is_the_analytic_one_of_a_linear_softmax(one_thread):
    vocab = 7
    model = Bigram(vocab)
    probe = _batch(5, vocab)
    value, (grad,) = probe_entropy_gradient(model, probe, chunk=3, micro_batch_size=2)
    # H = (1/N) sum over response tokens t of H(softmax(table[x_{t-1}])); dH/dz = -p (log p + H)
    expected, total, h_sum = torch.zeros(vocab, vocab, dtype=torch.float64), 0, 0.0
    for b in range(len(probe)):
        for t in range(1, probe.seq_len):
            if probe.response_mask[b, t] > 0:
                logp = torch.log_softmax(model.table[probe.input_ids[b, t - 1]].detach(), -1)
                h = -(logp.exp() * logp).sum()
                expected[probe.input_ids[b, t - 1]] += -logp.exp() * (logp + h)
                h_sum += float(h)
                total += 1
    assert value == pytest.approx(h_sum / total, rel=1e-5)
    torch.testing.assert_close(grad.double(), expected / total, rtol=1e-4, atol=1e-6)


def test_first_order_change_is_minus_the_dot_product():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([0.5, -1.0]), torch.tensor([[2.0]])]
    assert first_order_change(a, b) == pytest.approx(-(0.5 - 2.0 + 6.0))


def _probe_entropy(model, probe) -> float:
    return probe_entropy_gradient(model, probe)[0]


@pytest.mark.parametrize("part", ["grpo", "reinforce"])
def test_predicted_change_matches_a_small_gradient_step(one_thread, part):
    """dH predicted = -eta <grad H_probe, g> against H_probe after the step theta - eta * g."""
    model = tiny_qwen(seed=1)
    with torch.no_grad():  # an untrained model is near uniform (H ~ log V, grad H ~ 0): sharpen it
        model.lm_head.weight.mul_(30)
    cfg = Config()
    trainer = diagnostics._one_step_trainer(cfg, None)
    probe = _batch(6, VOCAB, seed=1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    if part == "grpo":
        grads, _ = grpo_gradient(model, _batch(8, VOCAB, seed=2, rewards=rewards), cfg, trainer, 4)
    else:
        grads, _, used = reinforce_gradient(model, _batch(8, VOCAB, seed=2, rewards=rewards, temperature=1.5), cfg, trainer, 4)
        assert used.tolist() == [0, 3, 4, 5]
    h0, grad_h = probe_entropy_gradient(model, probe)
    per_eta = first_order_change(grad_h, grads)
    eta = 1e-3 / abs(per_eta)  # a step that moves H_probe by about 0.001 nats (of about 1.2)
    with torch.no_grad():
        for p, g in zip(trainable(model), grads, strict=True):
            p -= eta * g
    actual = _probe_entropy(model, probe) - h0
    assert actual == pytest.approx(eta * per_eta, rel=0.03)


def test_reinforce_gradient_is_the_token_mean_of_minus_grad_logp_at_t1_over_the_positives(one_thread):
    model = tiny_qwen(seed=2)
    cfg = Config()
    trainer = diagnostics._one_step_trainer(cfg, None)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # group 2 all wrong: no positive
    reg = _batch(8, VOCAB, seed=3, rewards=rewards, temperature=2.0)
    grads, metrics, used = reinforce_gradient(model, reg, cfg, trainer, 4)
    assert used.tolist() == [0, 2, 3]
    rows = reg.select(used)
    logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, rows.input_ids[:, 1:, None]).squeeze(-1)
    mask = rows.response_mask[:, 1:]
    loss = -(logp * mask).sum() / mask.sum()  # scored at T = 1, not at the sampling T = 2
    expected = torch.autograd.grad(loss, trainable(model), allow_unused=True)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e if e is not None else torch.zeros_like(g), rtol=1e-4, atol=1e-6)
    # every row (reward-agnostic): all 8 rows, and none at all when no group is mixed
    assert reinforce_gradient(model, reg, cfg, trainer, 4, positives_only=False)[2].tolist() == list(range(8))
    none = reg.with_fields(rewards=torch.zeros(8))
    assert reinforce_gradient(model, none, cfg, trainer, 4)[0] is None


def test_update_weight_replace_and_add():
    cfg = Config().model_copy(deep=True)
    cfg.rollout.prompts_per_batch, cfg.rollout.n = 32, 8  # batch 256 rows; regulariser batch 8 x 8 = 64
    cfg.algorithm.reinforce_sample_num = 8
    # 16 of 128 rows positive -> 8 expected positives of 64 -> k = min(8, 8); positives 40 tokens/row
    k, scale = update_weight(cfg, positives=16, rows=128, positive_norm=16 * 40.0, grpo_norm_per_row=50.0)
    assert k == pytest.approx(8.0)
    assert scale == pytest.approx(8 * 40.0 / ((256 - 8) * 50.0 + 8 * 40.0))
    k, _ = update_weight(cfg, positives=2, rows=128, positive_norm=80.0, grpo_norm_per_row=50.0)
    assert k == pytest.approx(1.0)  # only 1 expected positive: k below K
    cfg.algorithm.combine, cfg.algorithm.alpha = "add", 0.5
    assert update_weight(cfg, 16, 128, 640.0, 50.0) == (8.0, 0.5)
    assert update_weight(cfg, 0, 128, 0.0, 50.0) == (0.0, 0.0)


def test_mean_se_and_ratio():
    m, se, count = mean_se([1.0, 3.0, math.nan])
    assert (m, count) == (2.0, 2) and se == pytest.approx(1.0)
    assert math.isnan(mean_se([1.0])[1])
    ratio, rse = ratio_se([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert ratio == 2.0 and rse == 0.0
    ratio, rse = ratio_se([1.0, 3.0], [2.0, 2.0])
    assert ratio == 1.0 and rse == pytest.approx(0.5)  # se(a) / b


class _CoinVerifier:
    """Reward 1 for about half of the (random) responses: positives for the tiny untrained policy."""

    def judge_batch(self, responses, golds):
        return [Judgement(float(zlib.crc32(r.encode()) % 2), "correct", None) for r in responses]

    def close(self) -> None:
        pass


def test_command_end_to_end_on_a_tiny_policy(tmp_path, tokenizer, monkeypatch, one_thread):
    folder = tmp_path / "policy"
    folder.mkdir()
    write_policy(tiny_qwen(hidden_size=32, intermediate_size=64, tokenizer=tokenizer), tokenizer, folder)
    monkeypatch.setattr(diagnostics, "make_verifier", lambda *a, **k: _CoinVerifier())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "entropy-push", "--model", str(folder), "--prompts", "3", "--n", "4", "--probe", "4", "--repeats", "2",
        "--temperatures", "0.8,1.5", "--out", str(out),
        "data.synthetic.n_train=50", "rollout.max_new_tokens=6", "trainer.device=cpu",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "entropy_push.json").read_text())
    names = [p["part"] for p in report["parts"]]
    assert names == ["grpo", "reinforce-pos@0.8", "reinforce-all@0.8", "reinforce-pos@1.5", "reinforce-all@1.5"]
    for p in report["parts"]:
        assert math.isfinite(p["dH_per_eta"]) and math.isfinite(p["dH_per_eta_se"]), p
        if p["kind"] != "grpo":
            assert math.isfinite(p["update_dH_per_eta_se"]) and math.isfinite(p["ratio_to_grpo"]), p
    assert math.isfinite(report["probe_entropy"]) and report["probe_entropy"] > 0
    for name in names:
        assert name in result.output
    assert "probe entropy" in result.output
    assert (out / "entropy_push.md").read_text().count("|") > 20


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        ["entropy-push", "--model", str(tmp_path / "nowhere")],
        ["entropy-push", "--run-dir", str(tmp_path / "no-run"), "--iteration", "0"],
        ["entropy-push", "--iteration", "1"],
    ]
    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(), run / "config.yaml")
    cases.append(["entropy-push", "--run-dir", str(run), "--iteration", "3"])  # no update of iteration 2
    cases.append(["entropy-push", "--run-dir", str(run)])
    cases.append(["entropy-push", "--model", str(tmp_path), "--temperatures", "1,x"])
    for args in cases:
        with pytest.raises(SystemExit) as exit_info:  # the app's own handler: `error: ...`, status 2
            app(args)
        assert exit_info.value.code == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)


def test_a_run_iteration_resolves_to_the_policy_it_starts_from(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aepo_core.pipeline.diagnostics import PolicyNotFound, resolve_target

    run = tmp_path / "run"
    (run / "dataset").mkdir(parents=True)
    save_config(Config(), run / "config.yaml")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (run / "base.json").write_text(json.dumps({"path": str(tmp_path / "base"), "digest": "x"}))
    pq.write_table(pa.table({"id": ["a"], "prompt": ["Add: 1 2"], "answer": ["3"], "source": ["s"]}),
                   run / "dataset" / "train.parquet")
    cfg, path, table = resolve_target(run_dir=run, iteration=0, overrides=["rollout.n=4"])
    assert path == tmp_path / "base" and cfg.rollout.n == 4 and table.num_rows == 1
    with pytest.raises(PolicyNotFound, match="update of iteration 0 has not finished"):
        resolve_target(run_dir=run, iteration=1)
