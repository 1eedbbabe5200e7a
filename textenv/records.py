"""Readers for users' data files and hub data sets: prompts (the envs), texts and demonstrations (the trainers).

Local files: .jsonl (one JSON object per line), .csv (header row), .parquet; and for plain text, .txt (documents
separated by blank lines). Anything else that is not an existing path is taken as a `datasets` hub id (split
"train"), which needs the network.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet")


def read_records(path: str | Path) -> list[dict]:
    """The rows of a .jsonl/.csv/.parquet file as dicts; ValueError naming the file on an empty, non-UTF-8 or
    unreadable file or a malformed JSONL line."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(f"a data file must be a path, got {path!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    try:
        return _read_records(path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as "
                         "UTF-8") from None


def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"data file {path} is not a readable parquet file ({exc})") from None
    else:
        raise ValueError(f"unsupported data file {path}: use one of {RECORD_SUFFIXES} (or .txt for plain text)")
    if not records:
        raise ValueError(f"data file {path} is empty (no records)")
    return records


def _hub_records(name: str) -> list[dict]:
    import datasets  # only for hub ids: needs the network

    records = datasets.load_dataset(name, split="train").to_list()
    if not records:
        raise ValueError(f"hub data set {name!r} has no records in its train split")
    return records


def _check_source(source) -> None:
    """A data source must be a path or a hub id; ValueError naming it otherwise (before the hub client sees it)."""
    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise ValueError(f"data source {source!r} is neither a file path nor a hub id")


def _records(source: str | Path) -> tuple[list[dict], str]:
    _check_source(source)
    path = Path(source)
    if path.exists() or path.suffix in RECORD_SUFFIXES + (".txt",):
        return read_records(path), str(path)
    if any(ch.isspace() for ch in str(source)):  # no file of that name, and no hub id has a space
        raise ValueError(f"data source {source!r}: no such file, and not a hub id")
    return _hub_records(str(source)), f"hub data set {source!r}"


def _column(records: list[dict], column: str, where: str) -> list[str]:
    values = []
    for i, record in enumerate(records):
        if column not in record:
            raise ValueError(f"{where}: record {i} has no column {column!r}; columns present: {sorted(record)}")
        if not isinstance(record[column], str):
            raise ValueError(f"{where}: record {i}, column {column!r} is {type(record[column]).__name__}, not a string")
        values.append(record[column])
    return values


def load_text_source(source: str | Path | None, column: str = "text") -> list[str]:
    """Documents for pretraining: the embedded generated corpus (None), a .txt file, a record file or a hub id."""
    if source is None:
        from textenv.data.corpus import generate_corpus

        return generate_corpus(seed=0)
    _check_source(source)
    path = Path(source)
    if path.suffix == ".txt":
        if not path.is_file():
            raise ValueError(f"data file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"data file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save "
                             "it as UTF-8") from None
        docs = [d.strip() for d in text.split("\n\n")]
        where = str(path)
    else:
        records, where = _records(source)
        docs = _column(records, column, where)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{where} is empty (no non-blank text)")
    return docs


def load_pairs(source: str | Path, prompt_col: str = "prompt", response_col: str = "response") -> list[dict]:
    """[{"prompt": str, "response": str}] from a .jsonl/.csv/.parquet file or a hub id, columns renamed."""
    records, where = _records(source)
    prompts, responses = _column(records, prompt_col, where), _column(records, response_col, where)
    return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]


def load_conversations(source: str | Path, column: str = "messages") -> list[list[dict]]:
    """Conversations from a .jsonl/.csv/.parquet file or a hub id: each record's `column` is a list of
    {"role": "system" | "user" | "assistant" | "tool", "content": str} messages (the env's own format)."""
    from textenv.chat import check_message

    records, where = _records(source)
    out = []
    for i, record in enumerate(records):
        if column not in record:
            raise ValueError(f"{where}: record {i} has no column {column!r}; columns present: {sorted(record)}")
        messages = record[column]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: record {i}, column {column!r} must be a non-empty list of messages, got "
                             f"{messages!r}")
        out.append([check_message(m, f"{where}: record {i}, message {j}") for j, m in enumerate(messages)])
    return out
