import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aepo_core.config import DataConfig
from aepo_core.datasets import COLUMNS, DatasetError, load_prompt_table
from aepo_core.synthetic import make_splits, parse_terms, worked_trace
from aepo_core.verifiers import SyntheticVerifier


def test_synthetic_splits_are_seeded_disjoint_and_verifiable():
    data = DataConfig()
    train = load_prompt_table(data, "train")
    held_out = load_prompt_table(data, "eval")
    assert train.column_names == list(COLUMNS)
    assert train.num_rows == data.synthetic.n_train and held_out.num_rows == data.synthetic.n_eval
    assert not set(train.column("prompt").to_pylist()) & set(held_out.column("prompt").to_pylist())
    assert load_prompt_table(data, "eval").equals(held_out)  # deterministic from the seed
    again = make_splits(data.synthetic.seed + 1, 50, 10, 3, 5, 9)
    assert again[0][0].terms != make_splits(data.synthetic.seed, 50, 10, 3, 5, 9)[0][0].terms


def test_every_order_of_the_trace_is_correct():
    import random

    rng = random.Random(0)
    terms = (7, 5, 9, 3)
    traces = {worked_trace(terms, rng) for _ in range(100)}
    assert len(traces) > 10  # many valid responses per prompt
    assert all(SyntheticVerifier().judge(t, "24").reward == 1.0 for t in traces)
    assert parse_terms("Add: 7 5 9 3") == terms and parse_terms("Mul: 1") is None


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_with_custom_and_nested_columns(tmp_path):
    path = tmp_path / "dapo.jsonl"
    _write_jsonl(
        path,
        [
            {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": "2"}, "k": "a"},
            {"prompt": [{"role": "user", "content": "What is 2+2?"}], "reward_model": {"ground_truth": "4"}, "k": "b"},
        ],
    )
    data = DataConfig(train=str(path), answer_column="reward_model.ground_truth", id_column="k")
    table = load_prompt_table(data, "train")
    assert table.to_pylist() == [
        {"id": "a", "prompt": "What is 1+1?", "answer": "2", "source": "dapo"},
        {"id": "b", "prompt": "What is 2+2?", "answer": "4", "source": "dapo"},
    ]


def test_parquet_and_csv(tmp_path):
    pq.write_table(pa.table({"problem": ["p1", "p2"], "solution": ["1", "2"], "level": ["L1", "L2"]}), tmp_path / "m.parquet")
    data = DataConfig(train=str(tmp_path / "m.parquet"), prompt_column="problem", answer_column="solution", source_column="level")
    table = load_prompt_table(data, "train")
    assert table.column("source").to_pylist() == ["L1", "L2"] and table.column("id").to_pylist() == ["m-000000", "m-000001"]
    (tmp_path / "m.csv").write_text("prompt,answer\nhello,1\n")
    assert load_prompt_table(DataConfig(train=str(tmp_path / "m.csv")), "train").num_rows == 1


def test_missing_column_names_file_and_key(tmp_path):
    path = tmp_path / "x.jsonl"
    _write_jsonl(path, [{"question": "q", "answer": "1"}])
    with pytest.raises(DatasetError, match=r"x\.jsonl: no column 'prompt' \(data\.prompt_column\)"):
        load_prompt_table(DataConfig(train=str(path)), "train")


def test_empty_value_names_the_row(tmp_path):
    path = tmp_path / "x.jsonl"
    _write_jsonl(path, [{"prompt": "q", "answer": "1"}, {"prompt": "  ", "answer": "2"}])
    with pytest.raises(DatasetError, match=r"x\.jsonl: row 1 has an empty 'prompt'"):
        load_prompt_table(DataConfig(train=str(path)), "train")


def test_empty_missing_and_unsupported_files(tmp_path):
    (tmp_path / "empty.csv").write_text("prompt,answer\n")
    with pytest.raises(DatasetError, match="empty.csv"):
        load_prompt_table(DataConfig(train=str(tmp_path / "empty.csv")), "train")
    with pytest.raises(DatasetError, match="not found"):
        load_prompt_table(DataConfig(train=str(tmp_path / "nope.parquet")), "train")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="unsupported file type"):
        load_prompt_table(DataConfig(train=str(tmp_path / "a.txt")), "train")
    with pytest.raises(DatasetError, match="data.eval is not set"):
        load_prompt_table(DataConfig(train=str(tmp_path / "a.txt")), "eval")


def test_the_real_model_config_reads_both_math_layouts():
    from pathlib import Path

    from aepo_core.config import load_config
    from aepo_core.verifiers import MathVerifier

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "data/configs/qwen2.5-math-1.5b-gpu.yaml")
    data = cfg.data.model_copy(update={"train": str(repo / cfg.data.train), "eval": str(repo / cfg.data.eval)})
    train, held_out = load_prompt_table(data, "train"), load_prompt_table(data, "eval")
    assert train.num_rows == 6 and held_out.num_rows == 8
    assert train.column("prompt")[1].as_py() == "If $a+b=10$ and $a-b=4$, what is $ab$?"
    assert held_out.column("answer")[0].as_py() == "\\frac{5}{6}"
    verifier = MathVerifier(timeout_s=20)
    try:
        golds = train.column("answer").to_pylist() + held_out.column("answer").to_pylist()
        judged = verifier.judge_batch([f"so the answer is \\boxed{{{g}}}." for g in golds], golds)
    finally:
        verifier.close()
    assert [j.reward for j in judged] == [1.0] * len(golds)
