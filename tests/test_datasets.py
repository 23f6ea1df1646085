import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aepo_core.config import DataConfig
from aepo_core.io.datasets import COLUMNS, DatasetError
from aepo_core.io.verifiers import SyntheticVerifier
from aepo_core.pipeline.sources import load_prompt_table
from aepo_core.task.synthetic import make_splits, parse_terms, worked_trace


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
    traces = {worked_trace(terms, rng) for _ in range(200)}
    assert len(traces) == 24  # every order is a response: 4! of them
    assert all(SyntheticVerifier().judge(t, "4").reward == 1.0 for t in traces)  # 24 mod 10
    assert worked_trace((7, 5, 9, 3), rng, order_bias=1.0) == "7+5=2+9=1+3=4. Answer: 4"
    assert parse_terms("Add mod 10: 7 5 9 3") == terms and parse_terms("Mul: 1") is None


def test_synthetic_terms_are_distinct_digits():
    train, held_out = make_splits(3, 500, 50, 4, 7, 9)
    for p in train + held_out:
        assert len(set(p.terms)) == len(p.terms) and 4 <= len(p.terms) <= 7 and all(1 <= t <= 9 for t in p.terms)
    with pytest.raises(ValueError, match="max_terms <= max_value"):
        make_splits(3, 10, 5, 4, 10, 9)


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
    with pytest.raises(DatasetError, match=r"x\.jsonl: line 2 has an empty 'prompt' \(data\.prompt_column\): '  '"):
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
    from aepo_core.io.verifiers import MathVerifier

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


# ------------------------------------------------------------------ exact text, every format
BIG = "18446744073709551617"


def test_jsonl_numbers_keep_their_text(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(
        f'{{"prompt": "a", "answer": {BIG}, "id": 7, "src": 1}}\n'
        '{"prompt": "b", "answer": 4, "id": 8, "src": 2.50}\n'
        '{"prompt": "c", "answer": 1e3, "id": "08", "src": true}\n'
    )
    table = load_prompt_table(DataConfig(train=str(path), id_column="id", source_column="src"), "train")
    assert table.column("answer").to_pylist() == [BIG, "4", "1e3"]
    assert table.column("id").to_pylist() == ["7", "8", "08"]
    assert table.column("source").to_pylist() == ["1", "2.50", "true"]


def test_json_array_and_columns_keep_their_text(tmp_path):
    (tmp_path / "a.json").write_text(f'[{{"prompt": "a", "answer": {BIG}}}, {{"prompt": "b", "answer": 4.0}}]')
    (tmp_path / "c.json").write_text(f'{{"prompt": ["a", "b"], "answer": [{BIG}, 4]}}')
    (tmp_path / "d.json").write_text(f'{{"data": [{{"prompt": "a", "answer": {BIG}}}]}}')
    (tmp_path / "l.json").write_text(f'{{"prompt": "a", "answer": {BIG}}}\n{{"prompt": "b", "answer": 4}}\n')  # JSON lines
    got = {name: load_prompt_table(DataConfig(train=str(tmp_path / name)), "train").column("answer").to_pylist()
           for name in ("a.json", "c.json", "d.json", "l.json")}
    assert got == {"a.json": [BIG, "4.0"], "c.json": [BIG, "4"], "d.json": [BIG], "l.json": [BIG, "4"]}


def test_csv_cells_are_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(f"prompt,answer,id,source\np1,{BIG},001,A\np2,007,002,NA\np3,2.50,003,null\np4,None,004,1.0\np5,NA,005,\n")
    table = load_prompt_table(DataConfig(train=str(path), id_column="id"), "train")
    assert table.column("answer").to_pylist() == [BIG, "007", "2.50", "None", "NA"]
    assert table.column("id").to_pylist() == ["001", "002", "003", "004", "005"]
    with pytest.raises(DatasetError, match=r"t\.csv: row 5 has an empty 'source' \(data\.source_column\): ''"):
        load_prompt_table(DataConfig(train=str(path), source_column="source"), "train")
    path.write_text("prompt,answer,source\np,1,NA\nq,2,None\n")
    assert load_prompt_table(DataConfig(train=str(path), source_column="source"), "train").column("source").to_pylist() == ["NA", "None"]


def test_parquet_typed_columns_as_text(tmp_path):
    from decimal import Decimal

    pq.write_table(
        pa.table({
            "prompt": ["a", "b"],
            "answer": pa.array([18446744073709551615, 4], pa.uint64()),
            "id": pa.array([1, 2], pa.int64()),
            "src": pa.array([Decimal("2.50"), Decimal("1.00")], pa.decimal128(5, 2)),
        }),
        tmp_path / "t.parquet",
    )
    table = load_prompt_table(DataConfig(train=str(tmp_path / "t.parquet"), id_column="id", source_column="src"), "train")
    assert table.column("answer").to_pylist() == ["18446744073709551615", "4"]
    assert table.column("id").to_pylist() == ["1", "2"] and table.column("source").to_pylist() == ["2.50", "1.00"]


# ------------------------------------------------------------------ errors say where
def test_json_errors_name_file_line_and_value(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("")
    with pytest.raises(DatasetError, match=r"e\.jsonl: the file is empty"):
        load_prompt_table(DataConfig(train=str(path)), "train")
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": }\n')
    with pytest.raises(DatasetError, match=r"e\.jsonl: line 3 column 27 is not valid JSON \(Expecting value\): '\{\"prompt\": \"b\", \"answer\": \}'"):
        load_prompt_table(DataConfig(train=str(path)), "train")
    path.write_text('{"prompt": "a", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(DatasetError, match=r"e\.jsonl: line 2 is not a JSON object: '\[1, 2\]'"):
        load_prompt_table(DataConfig(train=str(path)), "train")
    path.write_text('{"prompt": "a", "answer": null}\n')
    with pytest.raises(DatasetError, match=r"e\.jsonl: line 1 has an empty 'answer' \(data\.answer_column\): null"):
        load_prompt_table(DataConfig(train=str(path)), "train")
    bad = tmp_path / "e.json"
    bad.write_text('[{"prompt": "a",\n "answer": 1,}]')
    with pytest.raises(DatasetError, match=r"e\.json: line 2 column 14 is not valid JSON \(Expecting property name.*\): '\"answer\": 1,\}\]'"):
        load_prompt_table(DataConfig(train=str(bad)), "train")
    bad.write_text('[{"prompt": "a", "answer": 1}, 5]')
    with pytest.raises(DatasetError, match=r"e\.json: row 2 is not a JSON object: '5'"):
        load_prompt_table(DataConfig(train=str(bad)), "train")
    bad.write_text('{"prompt": ["a", "b"], "answer": [1]}')
    with pytest.raises(DatasetError, match=r"e\.json: the columns have different lengths: \{'prompt': 2, 'answer': 1\}"):
        load_prompt_table(DataConfig(train=str(bad)), "train")
    path.write_text('{"prompt": [], "answer": 1}\n')
    with pytest.raises(DatasetError, match=r"e\.jsonl: line 1 has an empty 'prompt' \(data\.prompt_column\): \[\]"):
        load_prompt_table(DataConfig(train=str(path)), "train")
    csv_bad = tmp_path / "b.csv"
    csv_bad.write_text("prompt,answer\na,1\nb,2,3\n")
    with pytest.raises(DatasetError, match=r"b\.csv: could not be read as csv: .*line 3"):
        load_prompt_table(DataConfig(train=str(csv_bad)), "train")
    empty_csv = tmp_path / "e.csv"
    empty_csv.write_text("")
    with pytest.raises(DatasetError, match=r"e\.csv: the file is empty"):
        load_prompt_table(DataConfig(train=str(empty_csv)), "train")


def test_duplicate_ids_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, [{"prompt": "a", "answer": "1", "k": "x"}, {"prompt": "b", "answer": "2", "k": "y"},
                        {"prompt": "c", "answer": "3", "k": "x"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl: line 3 repeats id 'x' of line 1 \('k', data\.id_column\)"):
        load_prompt_table(DataConfig(train=str(path), id_column="k"), "train")
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,answer,k\na,1,07\nb,2,7\nc,3,07\n")  # "07" and "7" are different ids
    with pytest.raises(DatasetError, match=r"d\.csv: row 3 repeats id '07' of row 1"):
        load_prompt_table(DataConfig(train=str(csv), id_column="k"), "train")


def test_dotted_names_flat_column_first(tmp_path):
    path = tmp_path / "f.jsonl"
    _write_jsonl(path, [{"prompt": "a", "gold.answer": "flat", "gold": {"answer": "nested"}}])
    assert load_prompt_table(DataConfig(train=str(path), answer_column="gold.answer"), "train").column("answer").to_pylist() == ["flat"]
    _write_jsonl(path, [{"prompt": "a", "gold": {"answer": "nested"}}])
    assert load_prompt_table(DataConfig(train=str(path), answer_column="gold.answer"), "train").column("answer").to_pylist() == ["nested"]
    _write_jsonl(path, [{"prompt": "a", "rm": {"a.b": "dotted key inside"}}])
    assert load_prompt_table(DataConfig(train=str(path), answer_column="rm.a.b"), "train").column("answer").to_pylist() == ["dotted key inside"]
    csv = tmp_path / "f.csv"
    csv.write_text("prompt,gold.answer\nq,42\n")
    assert load_prompt_table(DataConfig(train=str(csv), answer_column="gold.answer"), "train").column("answer").to_pylist() == ["42"]
    pq.write_table(pa.table({"prompt": ["q"], "gold.answer": ["42"]}), tmp_path / "f.parquet")
    assert load_prompt_table(DataConfig(train=str(tmp_path / "f.parquet"), answer_column="gold.answer"), "train").column("answer").to_pylist() == ["42"]
    _write_jsonl(path, [{"prompt": "a", "gold": {"other": 1}}])
    with pytest.raises(DatasetError, match=r"f\.jsonl: line 1 has no 'gold\.answer' \(data\.answer_column\)"):
        load_prompt_table(DataConfig(train=str(path), answer_column="gold.answer"), "train")


def test_exact_golds_score_end_to_end(tmp_path):
    """The loaded gold is what the verifiers compare: the big integer and '4' stay exact."""
    path = tmp_path / "g.jsonl"
    path.write_text(f'{{"prompt": "a", "answer": {BIG}}}\n{{"prompt": "b", "answer": 4}}\n')
    golds = load_prompt_table(DataConfig(train=str(path)), "train").column("answer").to_pylist()
    j = SyntheticVerifier().judge_batch([f"Answer: {BIG}", "Answer: 4"], golds)
    assert [(x.reward, x.verdict) for x in j] == [(1.0, "correct"), (1.0, "correct")]
