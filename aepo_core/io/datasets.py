"""Prompt datasets -> the normalised table every stage reads: id, prompt, answer, source (all strings).

Sources: a user's local parquet / jsonl / json / csv file (nothing is downloaded; the embedded
synthetic task's table is aepo_core.task.synthetic's, and aepo_core.pipeline.sources picks one): parquet and csv through the `datasets` library (csv with every column read as text), json
and jsonl with the standard library so that numbers keep the digits the file holds. Answers, ids and
sources are the exact text of the file, whatever its format. Column names are configurable; a dotted name reaches into a
nested column (DAPO-Math-17k keeps its gold answer in `reward_model.ground_truth`), and a prompt stored
as a list of chat messages contributes its last user message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from aepo_core.config import DataConfig
from aepo_core.errors import UserError

COLUMNS = ("id", "prompt", "answer", "source")
SCHEMA = pa.schema([(c, pa.string()) for c in COLUMNS])
_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DatasetError(UserError):
    """A user dataset cannot be read or lacks a configured column; the message names file, row, key."""


def _get(record: dict[str, Any], dotted: str) -> Any:
    """record[dotted]: a key spelled exactly so wins (a flat column named "gold.answer"); otherwise
    the dots reach into nested objects, longest key first ("reward_model.ground_truth"). KeyError
    when neither exists."""
    if dotted in record:
        return record[dotted]
    parts = dotted.split(".")
    for k in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:k])
        if head in record and isinstance(record[head], dict):
            try:
                return _get(record[head], ".".join(parts[k:]))
            except KeyError:
                continue
    raise KeyError(dotted)


def _has_column(columns: list[str], dotted: str) -> bool:
    """Whether a top-level column can hold `dotted` (itself, or a column its dotted path starts with)."""
    parts = dotted.split(".")
    return any(".".join(parts[:k]) in columns for k in range(len(parts), 0, -1))


def _prompt_text(value: Any) -> Any:
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m["content"] for m in value if m.get("role", "user") == "user"]
        return users[-1] if users else value[-1]["content"]
    return value


def _as_text(value: Any) -> Any:
    """A cell as the text the file holds: JSON numbers arrive as their own text (`_read_json`),
    CSV cells as strings, typed parquet integers as their digits (4 -> "4", never "4.0")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict | list):
        import json

        return json.dumps(value, ensure_ascii=False) if value else ""  # [] or {} holds nothing
    return value


def _read_json(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The records of a .jsonl / .json file and what a record position is called ("line" for JSON
    lines, "row" for a JSON array or a table of columns). Numbers are kept as the text the file holds
    (`parse_int`/`parse_float` = str): the `datasets` JSON reader infers one type per column, which
    turns 18446744073709551617 into 1.8446744073709552e+19 and 4 into 4.0."""
    import json

    def loads(text: str) -> Any:
        return json.loads(text, parse_int=str, parse_float=str, parse_constant=str)

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty (no rows)")
    if path.suffix.lower() == ".json":
        try:
            whole = loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": JSON lines in a .json file, read below
                line = text.splitlines()[exc.lineno - 1].strip() if exc.lineno <= len(text.splitlines()) else ""
                raise DatasetError(
                    f"{path}: line {exc.lineno} column {exc.colno} is not valid JSON ({exc.msg}): {line[:80]!r}"
                ) from None
        else:
            if isinstance(whole, dict):
                lists = [v for v in whole.values() if isinstance(v, list)]
                if len(whole) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
                    whole = lists[0]  # {"data": [{...}, ...]}
                elif lists and len(lists) == len(whole):  # a table of columns: {"prompt": [...], ...}
                    lengths = {k: len(v) for k, v in whole.items()}
                    if len(set(lengths.values())) != 1:
                        raise DatasetError(f"{path}: the columns have different lengths: {lengths}")
                    keys = list(whole)
                    whole = [dict(zip(keys, row, strict=True)) for row in zip(*whole.values(), strict=True)]
                else:
                    whole = [whole]
            if not isinstance(whole, list):
                raise DatasetError(f"{path}: expected a JSON array of objects, got a {type(whole).__name__}")
            for row, record in enumerate(whole, start=1):
                if not isinstance(record, dict):
                    raise DatasetError(f"{path}: row {row} is not a JSON object: {str(record)[:80]!r}")
            return whole, "row"
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{path}: line {number} column {exc.colno} is not valid JSON ({exc.msg}): {line.strip()[:80]!r}"
            ) from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: line {number} is not a JSON object: {line.strip()[:80]!r}")
        records.append((number, record))
    return records, "line"  # type: ignore[return-value]


def _read_table(path: Path, fmt: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str], str]:
    """(position, record) pairs, the top-level column names and what a position is called."""
    if fmt == "json":
        records, unit = _read_json(path)
        numbered = records if unit == "line" else list(enumerate(records, start=1))
        columns = list(dict.fromkeys(k for _, r in numbered for k in r))
        return numbered, columns, unit
    import datasets

    datasets.disable_progress_bars()  # one local file: a progress bar per load is noise in the logs
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        # every cell is text: no number inference ("007", "2.50", 18446744073709551617 stay as written)
        # and no missing-value inference ("None", "NA" are answers; an empty cell stays empty)
        import csv

        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), None)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DatasetError(f"{path}: could not read the CSV header: {exc}") from None
        if not header:
            raise DatasetError(f"{path}: the file is empty (no header row)")
        kwargs = {
            "features": datasets.Features({c: datasets.Value("string") for c in header}),
            "keep_default_na": False,
        }
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs the file name
        root = exc  # datasets wraps the reader's error ("An error occurred while generating the dataset")
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        reason = str(root).strip() or type(root).__name__
        raise DatasetError(f"{path}: could not be read as {fmt}: {reason}") from exc
    return list(enumerate(ds, start=1)), list(ds.column_names), "row"


def load_file_table(path: str | Path, data: DataConfig) -> pa.Table:
    """Read a local parquet/jsonl/json/csv file and normalise its configured columns.

    Every value is the exact text the file holds, for every format (no type inference on answers,
    ids or sources). Raises `DatasetError` naming the file, the line (JSON lines) or row (counted
    from 1, the CSV header not counted), the column and the value."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path}: unsupported file type '{path.suffix}' (use .parquet, .jsonl, .json or .csv)")
    records, top, unit = _read_table(path, fmt)
    if not records:
        raise DatasetError(f"{path}: the file holds no rows")
    wanted = {"prompt": data.prompt_column, "answer": data.answer_column}
    if data.id_column:
        wanted["id"] = data.id_column
    if data.source_column:
        wanted["source"] = data.source_column
    for role, column in wanted.items():
        if not _has_column(top, column):
            raise DatasetError(
                f"{path}: no column '{column}' (data.{role}_column); the file has columns {sorted(top)}"
            )
    out: dict[str, list[str]] = {c: [] for c in COLUMNS}
    first_seen: dict[str, int] = {}
    for row, (position, record) in enumerate(records):
        values = {}
        for role, column in wanted.items():
            try:
                value = _get(record, column)
            except KeyError:
                raise DatasetError(f"{path}: {unit} {position} has no '{column}' (data.{role}_column)") from None
            if role == "prompt":
                value = _prompt_text(value)
            raw, value = value, _as_text(value)
            if value is None or (isinstance(value, str) and not value.strip()):
                shown = "null" if raw is None else repr(raw)
                raise DatasetError(f"{path}: {unit} {position} has an empty '{column}' (data.{role}_column): {shown}")
            values[role] = str(value)
        row_id = values.get("id", f"{path.stem}-{row:06d}")
        if row_id in first_seen:
            raise DatasetError(
                f"{path}: {unit} {position} repeats id {row_id!r} of {unit} {first_seen[row_id]} "
                f"('{data.id_column}', data.id_column); ids must be unique"
            )
        first_seen[row_id] = position
        out["id"].append(row_id)
        out["prompt"].append(values["prompt"])
        out["answer"].append(values["answer"])
        out["source"].append(values.get("source", path.stem))
    return pa.table(out, schema=SCHEMA)


def load_file_split(data: DataConfig, split: str) -> pa.Table:
    """The normalised table of a split ("train" or "eval") read from the user's file (data.train or
    data.eval, with the eval split's own column names when set)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    source = data.train if split == "train" else data.eval
    if source is None:
        raise DatasetError("data.eval is not set: give a held-out file for evaluation")
    if split == "eval":
        data = data.model_copy(
            update={
                "prompt_column": data.eval_prompt_column or data.prompt_column,
                "answer_column": data.eval_answer_column or data.answer_column,
            }
        )
    return load_file_table(source, data)
