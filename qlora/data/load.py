"""Read dataset rows from JSON / JSONL / CSV / parquet files and `datasets.save_to_disk` directories.

Every failure is a one-line `QloraError` that names the file (and the line where there is one).
Rows remember where they came from (`Rows.where(i)`), so later validation errors can point at
`train.jsonl:17` instead of "row 16 of something".
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

from ..errors import QloraError

_PARQUET_MAGIC = b"PAR1"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")  # org/name or org/name:split
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".pq")  # a missing local file, not a hub name
# Python's json parser recurses once per nesting level; past the interpreter's limit (~1000) it raises
# RecursionError. No row format nests deeper than a few levels, so such a row is bad input, not a bug.
_TOO_DEEP = "JSON nested too deeply for Python's parser (more than ~1000 levels of [ or {); fix or delete this row"
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class Rows(list):
    """A list of row dicts that also knows each row's file and line (None: count rows instead)."""

    def __init__(self, items, source: str, lines: list[int] | None = None):
        super().__init__(items)
        self.source = source
        self.lines = lines

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source}: row {i + 1}"


def where(rows: list, i: int, source: str) -> str:
    """'file:line' for rows from `load_rows`, 'source: row N' (1-based) for plain lists."""
    return rows.where(i) if isinstance(rows, Rows) else f"{source}: row {i + 1}"


def type_name(value) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def load_rows(path: str) -> Rows:
    """All rows of a dataset file, `load_from_disk` directory, or hub dataset (org/name[:split]), as dicts."""
    p = Path(path)
    if not p.exists() and _HUB_NAME.match(path) and p.suffix.lower() not in _FILE_SUFFIXES:
        rows = _load_hub(path)
    elif not p.exists():
        raise QloraError(f"{path}: no such file or directory")
    elif p.is_dir():
        rows = _load_saved_dataset(p, path)
    else:
        rows = _load_file(p, path)
    if not rows:
        raise QloraError(f"{path}: the dataset is empty (no rows); point data at a file with examples")
    return rows


def _load_file(p: Path, path: str) -> Rows:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise QloraError(f"{path}: cannot read the file ({e.strerror or e})") from None
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq") or raw.startswith(_PARQUET_MAGIC):
        return _load_parquet(path)
    text = _decode(raw, path)
    if suffix in (".csv", ".tsv"):
        return _load_csv(text, path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        return _load_json_document(text, path)
    return _load_jsonl(text, path)


def _decode(raw: bytes, path: str) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Excel, Notepad) is not an error
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        byte = raw[e.start : e.start + 1].hex()
        raise QloraError(
            f"{path}:{line}: invalid UTF-8 byte 0x{byte} at column {col}; the file must be UTF-8 text "
            "(re-encode it, e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _load_jsonl(text: str, path: str) -> Rows:
    rows, lines = [], []
    for n, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing newline) carry no row
        try:
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise QloraError(f"{path}:{n}: invalid JSON ({_json_problem(e)}); fix or delete this line") from None
        except RecursionError:
            raise QloraError(f"{path}:{n}: {_TOO_DEEP}") from None
        if not isinstance(row, dict):
            raise QloraError(f"{path}:{n}: expected a JSON object per line, got a {type_name(row)}")
        rows.append(row)
        lines.append(n)
    return Rows(rows, path, lines)


def _load_json_document(text: str, path: str) -> Rows:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: a JSONL file named .json
            return _load_jsonl(text, path)
        raise QloraError(f"{path}:{e.lineno}: invalid JSON ({_json_problem(e)})") from None
    except RecursionError:
        raise QloraError(f"{path}: {_TOO_DEEP}") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        keys = ", ".join(sorted(doc)) if isinstance(doc, dict) else type_name(doc)
        raise QloraError(f'{path}: expected a list of row objects or {{"data": [...]}}, '
                         f'got an object with keys [{keys}]')
    for i, row in enumerate(doc):
        if not isinstance(row, dict):
            raise QloraError(f"{path}: row {i + 1}: expected a JSON object, got a {type_name(row)}")
    return Rows(doc, path)


def _load_csv(text: str, path: str, sep: str) -> Rows:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    try:
        header = next(reader, None)
        if header is None:
            return Rows([], path)
        if len(set(header)) != len(header) or not all(h.strip() for h in header):
            raise QloraError(f"{path}:1: the header row needs distinct, non-empty column names, got {header}")
        rows, lines = [], []
        start = reader.line_num + 1
        for fields in reader:
            if fields and len(fields) != len(header):
                raise QloraError(f"{path}:{start}: {len(fields)} fields but the header has {len(header)} columns")
            if fields:
                rows.append(dict(zip(header, fields)))
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise QloraError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return Rows(rows, path, lines)


def _load_parquet(path: str) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QloraError(f"{path}: reading parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own wording
        raise QloraError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    return Rows(table.to_pylist(), path)


def _load_saved_dataset(p: Path, path: str) -> Rows:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((p / m).is_file() for m in markers):
        raise QloraError(
            f"{path}: is a directory but not a saved dataset (no dataset_info.json / dataset_dict.json); "
            "pass a .jsonl/.json/.csv/.parquet file or a datasets.save_to_disk directory"
        )
    try:
        import datasets
    except ImportError:
        raise QloraError(f"{path}: reading a saved dataset directory needs datasets (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets wraps arrow/fs errors in many types
        raise QloraError(f"{path}: cannot load the saved dataset ({_one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise QloraError(f"{path}: a dataset dict without a 'train' split (splits: {', '.join(ds)}); "
                             "save one split")
        ds = ds["train"]
    return Rows(ds.to_list(), path)


def _load_hub(name: str) -> Rows:
    """A hub dataset through datasets.load_dataset (split 'train' unless named); offline, a one-line error."""
    repo, _, split = name.partition(":")
    split = split or "train"
    advice = "it needs the network; or download it elsewhere and pass the local copy (a .jsonl or save_to_disk dir)"
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise QloraError(f"{name}: no such local file, and the hub dataset {repo!r} cannot be fetched offline "
                         f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); {advice}")
    try:
        import datasets
    except ImportError:
        raise QloraError(f"{name}: loading a hub dataset needs datasets (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as e:  # connection errors, missing repo or split: datasets raises many types
        raise QloraError(f"{name}: cannot load the hub dataset {repo!r} split {split!r} ({_one_line(e)}); "
                         f"{advice}") from None
    return Rows(ds.to_list(), name)


def _json_problem(e: json.JSONDecodeError) -> str:
    # json's messages read "Expecting value" or "Unterminated string starting at"
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__
