"""Prompt datasets -> the normalised table every stage reads: id, prompt, answer, source (all strings).

Sources: the embedded synthetic task, or a user's local parquet / jsonl / json / csv file read with the
`datasets` library (nothing is downloaded). Column names are configurable; a dotted name reaches into a
nested column (DAPO-Math-17k keeps its gold answer in `reward_model.ground_truth`), and a prompt stored
as a list of chat messages contributes its last user message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from aepo_core import synthetic
from aepo_core.config import DataConfig

COLUMNS = ("id", "prompt", "answer", "source")
SCHEMA = pa.schema([(c, pa.string()) for c in COLUMNS])
_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DatasetError(ValueError):
    """A user dataset cannot be read or lacks a configured column; the message names file, row, key."""


def synthetic_table(data: DataConfig, split: str) -> pa.Table:
    t = data.synthetic
    train, held_out = synthetic.make_splits(t.seed, t.n_train, t.n_eval, t.min_terms, t.max_terms, t.max_value)
    problems = train if split == "train" else held_out
    return pa.table(
        {
            "id": [p.id for p in problems],
            "prompt": [p.prompt for p in problems],
            "answer": [p.answer for p in problems],
            # the number of terms is the task's difficulty: the evaluation breaks accuracy down by it
            "source": [f"synthetic-{len(p.terms)}-terms" for p in problems],
        },
        schema=SCHEMA,
    )


def _get(record: dict[str, Any], dotted: str) -> Any:
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _prompt_text(value: Any) -> Any:
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m["content"] for m in value if m.get("role", "user") == "user"]
        return users[-1] if users else value[-1]["content"]
    return value


def load_file_table(path: str | Path, data: DataConfig) -> pa.Table:
    """Read a local parquet/jsonl/json/csv file and normalise its configured columns."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path}: unsupported file type '{path.suffix}' (use .parquet, .jsonl, .json or .csv)")
    import datasets

    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs the file name
        raise DatasetError(f"{path}: could not be read as {fmt}: {exc}") from exc
    if len(ds) == 0:
        raise DatasetError(f"{path}: the file holds no rows")
    wanted = {"prompt": data.prompt_column, "answer": data.answer_column}
    if data.id_column:
        wanted["id"] = data.id_column
    if data.source_column:
        wanted["source"] = data.source_column
    top = set(ds.column_names)
    for role, column in wanted.items():
        if column.split(".")[0] not in top:
            raise DatasetError(
                f"{path}: no column '{column}' (data.{role}_column); the file has columns {sorted(top)}"
            )
    out: dict[str, list[str]] = {c: [] for c in COLUMNS}
    for row, record in enumerate(ds):
        values = {}
        for role, column in wanted.items():
            try:
                value = _get(record, column)
            except KeyError:
                raise DatasetError(f"{path}: row {row} has no '{column}' (data.{role}_column)") from None
            if role == "prompt":
                value = _prompt_text(value)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DatasetError(f"{path}: row {row} has an empty '{column}' (data.{role}_column)")
            values[role] = str(value)
        out["id"].append(values.get("id", f"{path.stem}-{row:06d}"))
        out["prompt"].append(values["prompt"])
        out["answer"].append(values["answer"])
        out["source"].append(values.get("source", path.stem))
    if len(set(out["id"])) != len(out["id"]):
        raise DatasetError(f"{path}: ids in '{data.id_column}' are not unique")
    return pa.table(out, schema=SCHEMA)


def load_prompt_table(data: DataConfig, split: str) -> pa.Table:
    """The normalised table of a split ("train" or "eval")."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    source = data.train if split == "train" else data.eval
    if split == "eval" and source is None:
        if data.train != "synthetic":
            raise DatasetError("data.eval is not set: give a held-out file for evaluation")
        source = "synthetic"
    if source == "synthetic":
        return synthetic_table(data, split)
    if split == "eval":
        data = data.model_copy(
            update={
                "prompt_column": data.eval_prompt_column or data.prompt_column,
                "answer_column": data.eval_answer_column or data.answer_column,
            }
        )
    return load_file_table(source, data)
