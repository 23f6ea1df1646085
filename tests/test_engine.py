import pytest
import torch

from aepo_core.core.batch import SequenceBatch
from aepo_core.core.entropy import shifted_logprobs_and_entropy
from aepo_core.io.engines.base import SamplingRequest
from aepo_core.io.engines.hf import HFRolloutEngine, sample_tokens
from aepo_core.io.prompts import chat_prompt_ids


def _requests(tokenizer, temps, n=4, max_new=12, top_p=1.0):
    prompts = ["Add: 1 2", "Add: 7 5 9 3", "Add: 4 4 4"]
    return [
        SamplingRequest(chat_prompt_ids(tokenizer, p), n=n, temperature=t, top_p=top_p, max_new_tokens=max_new)
        for p, t in zip(prompts, temps, strict=True)
    ]


def test_shapes_order_and_budget(tiny_model, tokenizer):
    engine = HFRolloutEngine(tiny_model, tokenizer)
    reqs = _requests(tokenizer, [1.0, 1.0, 1.0], n=3, max_new=7)
    out = engine.generate(reqs, seed=0)
    assert [(c.request_index, c.sample_index) for c in out] == [(i, j) for i in range(3) for j in range(3)]
    for c in out:
        assert 1 <= len(c.token_ids) <= 7
        assert len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == tokenizer.eos_token_id
        else:
            assert len(c.token_ids) == 7 and tokenizer.eos_token_id not in c.token_ids
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_per_row_temperature_greedy_rows_repeat_and_t1_rows_vary(tiny_model, tokenizer):
    engine = HFRolloutEngine(tiny_model, tokenizer)
    reqs = _requests(tokenizer, [0.0, 1.0, 1.5], n=6, max_new=10)
    a = engine.generate(reqs, seed=1)
    b = engine.generate(reqs, seed=2)
    greedy_a = [tuple(c.token_ids) for c in a if c.request_index == 0]
    greedy_b = [tuple(c.token_ids) for c in b if c.request_index == 0]
    assert len(set(greedy_a)) == 1 and greedy_a == greedy_b  # greedy: identical across samples and seeds
    sampled = {tuple(c.token_ids) for c in a if c.request_index == 1}
    assert len(sampled) > 1  # an untrained model at T=1 varies
    assert [c.temperature for c in a] == [0.0] * 6 + [1.0] * 6 + [1.5] * 6
    # same seed, same request list -> same samples
    again = engine.generate(reqs, seed=1)
    assert [c.token_ids for c in again] == [c.token_ids for c in a]


def test_batching_does_not_change_greedy_rows(tiny_model, tokenizer):
    reqs = _requests(tokenizer, [0.0, 0.0, 0.0], n=2, max_new=9)
    whole = HFRolloutEngine(tiny_model, tokenizer).generate(reqs, seed=0)
    chunked = HFRolloutEngine(tiny_model, tokenizer, batch_size=2).generate(reqs, seed=0)
    assert [c.token_ids for c in whole] == [c.token_ids for c in chunked]


def test_logprobs_equal_a_forward_recomputation_at_the_sampling_temperature(tiny_model, tokenizer):
    engine = HFRolloutEngine(tiny_model, tokenizer)
    reqs = _requests(tokenizer, [1.0, 0.7, 1.3], n=3, max_new=10)
    out = engine.generate(reqs, seed=3)
    prompts = [reqs[c.request_index].prompt_token_ids for c in out]
    batch = SequenceBatch.from_token_lists(prompts, [c.token_ids for c in out], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    temps = torch.tensor([c.temperature for c in out]).view(-1, 1, 1)
    logp, _ = shifted_logprobs_and_entropy(logits / temps, batch.input_ids, with_entropy=False)
    for r, c in enumerate(out):
        recomputed = logp[r][batch.response_mask[r].bool()]
        assert torch.allclose(recomputed, torch.tensor(c.logprobs), atol=1e-4), r


def test_sample_tokens_top_p_renormalises_over_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        tok, lp = sample_tokens(logits, torch.tensor([1.0]), torch.tensor([0.7]), gen)
        seen.add(int(tok))
        # nucleus {0, 1} (0.5 + 0.3 >= 0.7): renormalised probabilities 0.625 and 0.375
        want = {0: 0.625, 1: 0.375}[int(tok)]
        assert abs(float(lp.exp()) - want) < 1e-5
    assert seen == {0, 1}


def test_sample_tokens_greedy_row_reports_t1_logprob():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    tok, lp = sample_tokens(logits, torch.tensor([0.0]), torch.tensor([1.0]), None)
    assert int(tok) == 0
    assert abs(float(lp) - float(torch.log_softmax(logits, -1)[0, 0])) < 1e-6


def test_vllm_engine_without_vllm_says_how_to_get_it(tmp_path):
    import importlib.util

    import pytest

    from aepo_core.config import load_config
    from aepo_core.io.engines import make_engine

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here; tests/test_vllm.py covers the engine")
    tokenizer_dir = tmp_path / "tok"
    from aepo_core.task.tokenizer import build_tokenizer

    build_tokenizer(["Add: 1 2"], vocab_size=270).save_pretrained(tokenizer_dir)
    with pytest.raises(ImportError, match="needs vLLM"):
        make_engine(load_config(None, ["rollout.engine=vllm"]), tokenizer_dir)


# ------------------------------------------------------------------ the engine protocol

ENGINE_CLASSES = [("aepo_core.io.engines.hf", "HFRolloutEngine"), ("aepo_core.io.engines.vllm", "VLLMRolloutEngine")]


def _protocol_members():
    from aepo_core.io.engines.base import RolloutEngine

    attributes = set(RolloutEngine.__annotations__)
    methods = {n for n, v in vars(RolloutEngine).items() if callable(v) and not n.startswith("_")}
    return attributes, methods


def _init_assigns(cls) -> set[str]:
    """The ``self.<name> = ...`` targets of ``cls.__init__``, read from its source (no instance)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name) and node.value.id == "self"
    }


@pytest.mark.parametrize("module, name", ENGINE_CLASSES, ids=["hf", "vllm"])
def test_both_engines_have_every_member_the_protocol_declares(module, name):
    import importlib
    import inspect
    import sys

    from aepo_core.io.engines.base import RolloutEngine

    had_vllm = "vllm" in sys.modules
    cls = getattr(importlib.import_module(module), name)
    assert ("vllm" in sys.modules) == had_vllm  # the vLLM engine imports vllm only when it is built
    attributes, methods = _protocol_members()
    assert {"tokenizer", "show_progress"} <= attributes and {"generate", "load_weights", "close"} <= methods
    for method in methods:
        impl = getattr(cls, method, None)
        assert callable(impl), f"{name} has no method {method}"
        declared = list(inspect.signature(getattr(RolloutEngine, method)).parameters)
        assert list(inspect.signature(impl).parameters)[: len(declared)] == declared, method
    missing = {a for a in attributes if not hasattr(cls, a)} - _init_assigns(cls)
    assert not missing, f"{name}.__init__ never sets {sorted(missing)}"


def test_hf_engine_instance_is_a_rollout_engine(tiny_model, tokenizer):
    from aepo_core.io.engines.base import RolloutEngine

    engine = HFRolloutEngine(tiny_model, tokenizer)
    assert isinstance(engine, RolloutEngine)
    attributes, _ = _protocol_members()
    assert all(hasattr(engine, a) for a in attributes)


def test_callers_use_only_what_the_protocol_declares():
    """Every ``engine.<member>`` in the package, flows and tasks is a member of RolloutEngine."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    attributes, methods = _protocol_members()
    implementations = {root / "aepo_core" / "engines" / "hf.py", root / "aepo_core" / "engines" / "vllm.py"}
    used = {}
    for folder in ("aepo_core", "flows", "tasks"):
        for path in sorted((root / folder).rglob("*.py")):
            if path in implementations:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine":
                    used.setdefault(node.attr, str(path.relative_to(root)))
    assert {"generate", "tokenizer", "show_progress"} <= set(used)  # the scan sees the stages' uses
    undeclared = {a: where for a, where in used.items() if a not in attributes | methods}
    assert not undeclared, f"engine members used but not declared in RolloutEngine: {undeclared}"


def test_rows_that_finish_leave_the_batch_without_changing_the_others(tiny_model, tokenizer):
    """Budgets 3, 6 and 10: rows drop out of the running batch (and its KV cache) at different steps;
    every row is what it is generated alone, and its log-probs are the model's."""
    prompts = ["Add: 1 2", "Add: 7 5 9 3", "Add: 4 4 4"]
    reqs = [SamplingRequest(chat_prompt_ids(tokenizer, p), n=2, temperature=0.0, top_p=1.0, max_new_tokens=m)
            for p, m in zip(prompts, (3, 10, 6), strict=True)]
    sizes = []
    hook = tiny_model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        together = HFRolloutEngine(tiny_model, tokenizer).generate(reqs, seed=0)
    finally:
        hook.remove()
    # the prompt pass and steps 1-2 on 6 rows, steps 3-5 on 4, steps 6-9 on 2: 10 passes in all
    assert sizes == [6, 6, 6, 4, 4, 4, 2, 2, 2, 2]
    alone = HFRolloutEngine(tiny_model, tokenizer, batch_size=1).generate(reqs, seed=0)
    assert [len(c.token_ids) for c in together] == [3, 3, 10, 10, 6, 6]  # the untrained model emits no EOS here
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_a_seeded_request_samples_the_same_alone_or_in_any_batch(tiny_model, tokenizer):
    """Per-response random streams: at T = 1.3 a seeded request's responses do not depend on the
    other requests of the call, their order, the engine's row batching or the call's seed."""
    reqs = [r for r in _requests(tokenizer, [1.0, 1.3, 0.7], n=3, max_new=8)]
    seeded = SamplingRequest(reqs[1].prompt_token_ids, n=3, temperature=1.3, max_new_tokens=8, seed=1234)
    engine = HFRolloutEngine(tiny_model, tokenizer)
    alone = engine.generate([seeded], seed=0)
    mixed = engine.generate([reqs[2], seeded, reqs[0]], seed=99)
    chunked = HFRolloutEngine(tiny_model, tokenizer, batch_size=2).generate([reqs[0], seeded], seed=5)
    assert len({tuple(c.token_ids) for c in alone}) > 1  # the three samples differ from each other
    assert [c.token_ids for c in alone] == [c.token_ids for c in mixed if c.request_index == 1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in chunked if c.request_index == 1]
    # unseeded requests: the call's seed and the request's position decide, not the row batching
    whole = engine.generate(reqs, seed=7)
    in_twos = HFRolloutEngine(tiny_model, tokenizer, batch_size=2).generate(reqs, seed=7)
    assert [c.token_ids for c in whole] == [c.token_ids for c in in_twos]
