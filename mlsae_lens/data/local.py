"""Local corpora: .txt files, JSON lines / JSON / parquet tables, and saved datasets.

A ``.txt`` file is one document; a table gives one document per record from its text column
(guessed or given), or, when it has an ``input_ids``/``tokens`` column of int lists, rows that
are already tokenized. A directory is read recursively in sorted order. Every unreadable,
empty or ambiguous input is refused with one :class:`MLSAEError` line naming the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlsae_lens.errors import MLSAEError

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES
# Columns that hold already-tokenized rows, in order of preference.
TOKEN_COLUMNS = ("input_ids", "tokens")
# Columns tried, in order, when the text column is not given.
TEXT_COLUMN_GUESSES = ("text", "content", "document")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def looks_local(source: str) -> bool:
    """Whether a missing ``source`` was meant as a path (so it is not sent to the hub)."""
    return (
        source.lower().endswith(SUPPORTED_SUFFIXES)
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def _local_files(path: Path) -> list[Path]:
    """The files a local source reads, in order; raises if there are none."""
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise MLSAEError(
                f"Unsupported corpus file type {path.suffix!r} for {path}. Use a .txt, .jsonl, "
                ".json or .parquet file (or a directory of them)."
            )
        return [path]
    if not path.is_dir():  # a FIFO, socket or device: neither a corpus file nor a directory
        raise MLSAEError(
            f"Corpus {path} is not a regular file or a directory (a FIFO, socket or device); "
            "pass a .txt, .jsonl, .json or .parquet file, or a directory of them."
        )
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise MLSAEError(
            f"Corpus directory {path} holds no .txt, .jsonl, .json or .parquet files. Add "
            "some, or point to a file."
        )
    return files


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise MLSAEError(f"Corpus file {path} is empty. Put text in it or choose another corpus.")


def _read_txt(path: Path) -> str:
    _check_not_empty(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise MLSAEError(
            f"Corpus file {path} is not UTF-8 text ({error.reason} at byte {error.start}). "
            "Convert it to UTF-8 or pass the right file."
        ) from None
    if not text.strip():
        raise MLSAEError(f"Corpus file {path} is empty. Put text in it or choose another corpus.")
    return text


def _json_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file, or of a ``.json`` file holding one list of objects."""
    _check_not_empty(path)
    try:
        with path.open(encoding="utf-8") as handle:
            head = handle.read(4096).lstrip()
            handle.seek(0)
            if path.suffix.lower() == ".json" and head.startswith("["):
                try:
                    records = json.load(handle)
                except json.JSONDecodeError as error:
                    raise MLSAEError(
                        f"Corpus file {path} is not valid JSON ({error.msg} at line "
                        f"{error.lineno}). Fix the file or save it as JSON lines."
                    ) from None
                for i, record in enumerate(records):
                    yield _as_record(record, path, i + 1)
                return
            found = False
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise MLSAEError(
                        f"Corpus file {path} is not valid JSON lines: line {lineno} does not "
                        f"parse ({error.msg}). Write one JSON object per line."
                    ) from None
                found = True
                yield _as_record(record, path, lineno)
            if not found:
                raise MLSAEError(
                    f"Corpus file {path} is empty (no JSON records). Add records or choose "
                    "another corpus."
                )
    except UnicodeDecodeError as error:
        raise MLSAEError(
            f"Corpus file {path} is not UTF-8 text ({error.reason} at byte {error.start}), so "
            "it cannot be JSON. Pass a UTF-8 JSON-lines file."
        ) from None


def _as_record(record: Any, path: Path, where: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise MLSAEError(
            f"Corpus file {path}: record {where} is a {type(record).__name__}, not a JSON object. "
            'Write one object per record, e.g. {"text": "..."}.'
        )
    return record


def _parquet_file(path: Path) -> Any:
    import pyarrow
    import pyarrow.parquet as pq

    _check_not_empty(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise MLSAEError(
            f"Corpus file {path} is not a readable parquet file ({error}). Pass a valid "
            ".parquet file or convert the data to .jsonl."
        ) from None
    if parquet.metadata.num_rows == 0:
        raise MLSAEError(
            f"Corpus file {path} is empty (0 rows). Add rows or choose another corpus."
        )
    return parquet


class _Table:
    """Uniform column access to one local table: jsonl/json, parquet or a saved dataset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if _is_saved_dataset(path):
            self.kind = "saved"
            self.dataset = _load_saved_dataset(path)
            if len(self.dataset) == 0:
                raise MLSAEError(f"Dataset {path} is empty (0 rows). Choose another corpus.")
            self.columns = list(self.dataset.column_names)
            first = self.dataset[0]
            self.is_string = {c: isinstance(first[c], str) for c in self.columns}
        elif path.suffix.lower() == ".parquet":
            import pyarrow

            self.kind = "parquet"
            self.parquet = _parquet_file(path)
            schema = self.parquet.schema_arrow
            self.columns = list(schema.names)
            self.is_string = {
                f.name: pyarrow.types.is_string(f.type) or pyarrow.types.is_large_string(f.type)
                for f in schema
            }
        else:
            self.kind = "json"
            first = next(_json_records(path))
            self.columns = list(first)
            self.is_string = {c: isinstance(v, str) for c, v in first.items()}

    def column(self, name: str) -> Iterator[Any]:
        """Values of one column, row by row."""
        if self.kind == "saved":
            for start in range(0, len(self.dataset), 1024):
                yield from self.dataset[start : start + 1024][name]
        elif self.kind == "parquet":
            for batch in self.parquet.iter_batches(batch_size=1024, columns=[name]):
                yield from batch.column(0).to_pylist()
        else:
            for i, record in enumerate(_json_records(self.path)):
                if name not in record:
                    raise MLSAEError(
                        f"Corpus file {self.path}: record {i + 1} has no {name!r} field. Give "
                        "every record the same columns."
                    )
                yield record[name]

    def token_column(self) -> str | None:
        return next((c for c in TOKEN_COLUMNS if c in self.columns), None)

    def text_column(self, text_column: str | None) -> str:
        """The text column: ``text_column`` if given, else a guess; raises if none fits."""
        if text_column is not None:
            if text_column not in self.columns:
                raise MLSAEError(
                    f"Column {text_column!r} not found in {self.path}; columns found: "
                    f"{self.columns}. Pass one of them with --text-column."
                )
            return text_column
        return guess_text_column(self.columns, self.is_string, str(self.path))


def guess_text_column(columns: list[str], is_string: dict[str, bool], where: str) -> str:
    """The text column: a usual name, else the only string column; raises if ambiguous."""
    for guess in TEXT_COLUMN_GUESSES:
        if guess in columns:
            return guess
    strings = [c for c in columns if is_string.get(c)]
    if len(strings) == 1:
        return strings[0]
    raise MLSAEError(
        f"No text column found in {where}; columns found: {columns}. Name the column holding "
        "the text with --text-column NAME (text_column= in Python)."
    )


def _load_saved_dataset(path: Path) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - any failure means the folder is unusable
        raise MLSAEError(
            f"Could not read the saved dataset {path} ({error}). Re-save it with "
            "Dataset.save_to_disk or pass a file."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise MLSAEError(
                f"Saved dataset {path} has splits {list(loaded)} but no 'train' split. Save the "
                "split you want as its own dataset."
            )
        loaded = loaded["train"]
    return loaded


def local_tables(path: Path) -> list[_Table] | None:
    """Tables of a local source, or None when it is plain text (.txt files)."""
    if _is_saved_dataset(path):
        return [_Table(path)]
    files = _local_files(path)
    if any(f.suffix.lower() in TEXT_SUFFIXES for f in files):
        return None
    return [_Table(f) for f in files]


def iter_local_documents(path: Path, text_column: str | None) -> Iterator[str]:
    """The text documents of a local source: one per .txt file, one per table row."""
    files = [path] if _is_saved_dataset(path) else _local_files(path)
    for file in files:
        if file.suffix.lower() in TEXT_SUFFIXES and not file.is_dir():
            yield _read_txt(file)
            continue
        table = _Table(file)
        if text_column is None and table.token_column() is not None:
            raise MLSAEError(
                f"{file} holds token ids (column {table.token_column()!r}), not text. Load it "
                "with load_token_splits, or pass --text-column to read a text column."
            )
        column = table.text_column(text_column)
        for i, value in enumerate(table.column(column)):
            if value is None:
                continue
            if not isinstance(value, str):
                raise MLSAEError(
                    f"{file}: row {i + 1} of column {column!r} is a {type(value).__name__}, not "
                    "text. Pass the text column with --text-column."
                )
            yield value


def iter_token_rows(tables: list[_Table], vocab_size: int) -> Iterator[list[int]]:
    """The already-tokenized rows of tables, checked to be int lists within the vocabulary."""
    for table in tables:
        column = table.token_column()
        assert column is not None
        for i, row in enumerate(table.column(column)):
            if not isinstance(row, list | tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in row
            ):
                raise MLSAEError(
                    f"{table.path}: row {i + 1} of column {column!r} is not a list of ints. "
                    "Store token ids as int lists, or pass --text-column to read text instead."
                )
            if row and (min(row) < 0 or max(row) >= vocab_size):
                raise MLSAEError(
                    f"{table.path}: row {i + 1} has token ids outside [0, {vocab_size}), so it "
                    "was tokenized with another tokenizer. Use the matching model or re-tokenize."
                )
            yield list(row)
