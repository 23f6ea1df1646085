import json
import math

import pyarrow as pa
import pytest

from aepo_core.io.engines.base import Completion
from aepo_core.io.verifiers import SyntheticVerifier
from aepo_core.pipeline.evaluation import (
    EvalSettings,
    accuracy_and_pass_at_k,
    evaluate,
    ks_up_to,
    metric_safe,
    pass_at_k,
    source_metric_names,
    write_source_names,
)


def test_pass_at_k_hand_values():
    # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # 1 - C(5,3)/C(8,3) = 1 - 10/56
    assert pass_at_k(8, 3, 3) == pytest.approx(1 - 10 / 56)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the plain success rate


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(1000, 500) ~ 2.7e299: the ratio C(999, 500)/C(1000, 500) = 500/1000 must still come out exact
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert math.isfinite(pass_at_k(5000, 7, 2500))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_accuracy_and_pass_at_k_over_prompts():
    # two prompts with 1 and 4 correct out of 4
    m = accuracy_and_pass_at_k([1, 4], 4)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["pass_at_1"] == pytest.approx((0.25 + 1) / 2)
    assert m["pass_at_2"] == pytest.approx((0.5 + 1) / 2)
    assert m["pass_at_4"] == pytest.approx(1.0)
    assert ks_up_to(6) == [1, 2, 4, 6]


def test_metric_safe_names():
    assert metric_safe("synthetic-3-terms") == "synthetic-3-terms"
    assert metric_safe("MATH/level 5 (algebra)") == "MATH_level 5 _algebra_"
    assert metric_safe("代数") == "代数" and metric_safe("Ελληνικά 2") == "Ελληνικά 2"  # MLflow takes Unicode \w
    assert metric_safe("..") == "_" and metric_safe("") == "_" and metric_safe("a:b") == "a_b"


def _hash(name):
    import hashlib

    return hashlib.sha256(name.encode()).hexdigest()[:8]


def test_source_metric_names_are_one_to_one_and_stable():
    names = source_metric_names(["代数", "几何", "MATH (L5)", "MATH [L5]", "a_b", "a/b", "plain", "代数"])
    assert names == {
        "代数": "代数",
        "几何": "几何",
        "MATH (L5)": f"MATH _L5__{_hash('MATH (L5)')}",
        "MATH [L5]": f"MATH _L5__{_hash('MATH [L5]')}",
        "a_b": "a_b",  # accepted as it is: keeps its name
        "a/b": f"a_b_{_hash('a/b')}",
        "plain": "plain",
    }
    assert source_metric_names(["MATH (L5)", "x"]) == {"MATH (L5)": "MATH _L5_", "x": "x"}  # no collision, no hash
    long = "k" * 300
    assert source_metric_names([long]) == {long: "k" * 160 + "_" + _hash(long)}
    # a source literally named like another's suffixed name still gets a distinct part
    tricky = ["a/b", f"a_b_{_hash('a/b')}", "a_b"]
    got = source_metric_names(tricky)
    assert len(set(got.values())) == 3 and got["a_b"] == "a_b"


class _ScriptedEngine:
    """Answers request i, sample j with texts[i][j]."""

    tokenizer = None

    def __init__(self, texts):
        self.texts = texts

    def generate(self, requests, seed):
        return [
            Completion(i, j, 1.0, [1, 2], [-0.5, -0.5], text, "stop")
            for i, texts in enumerate(self.texts)
            for j, text in enumerate(texts)
        ]


def test_per_source_metrics_do_not_collide(tmp_path):
    table = pa.table({
        "id": ["p1", "p2", "p3", "p4"],
        "prompt": ["a", "b", "c", "d"],
        "answer": ["1", "2", "3", "4"],
        "source": ["代数", "代数", "几何", "几何"],
    })
    engine = _ScriptedEngine([["Answer: 1"], ["Answer: 2"], ["Answer: 0"], ["Answer: 0"]])
    records, metrics = evaluate(engine, [[1]] * 4, table, SyntheticVerifier(), EvalSettings(n=1))
    assert metrics["代数/accuracy"] == 1.0 and metrics["几何/accuracy"] == 0.0
    assert metrics["代数/num_prompts"] == 2.0 and metrics["accuracy"] == 0.5 and metrics["bad_gold"] == 0.0
    table = table.set_column(3, "source", pa.array(["MATH (L5)", "MATH (L5)", "MATH [L5]", "MATH [L5]"]))
    records, metrics = evaluate(engine, [[1]] * 4, table, SyntheticVerifier(), EvalSettings(n=1))
    assert metrics[f"MATH _L5__{_hash('MATH (L5)')}/accuracy"] == 1.0
    assert metrics[f"MATH _L5__{_hash('MATH [L5]')}/accuracy"] == 0.0
    write_source_names(records, tmp_path)
    assert json.loads((tmp_path / "sources.json").read_text(encoding="utf-8")) == {
        "MATH (L5)": f"MATH _L5__{_hash('MATH (L5)')}",
        "MATH [L5]": f"MATH _L5__{_hash('MATH [L5]')}",
    }


def test_unicode_source_metrics_reach_mlflow(tmp_path):
    """MLflow's own validation accepts the names (a real local store, one metric each)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    names = source_metric_names(["代数", "几何", "MATH (L5)", "MATH [L5]", ".."])
    for i, part in enumerate(sorted(names.values())):
        client.log_metric(run.info.run_id, f"eval/{part}/accuracy", float(i))
    logged = client.get_run(run.info.run_id).data.metrics
    assert sorted(logged) == sorted(f"eval/{p}/accuracy" for p in names.values()) and len(logged) == 5
