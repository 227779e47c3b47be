"""Token corpora for training and analysing MLSAEs, packed into fixed-length contexts.

Every source ends up as one ``[n_contexts, context_size]`` LongTensor, split into train and
test rows. Text sources are tokenized without special tokens, documents are joined with the
tokenizer's EOS id *between* them (so the model sees document boundaries) and the stream is
cut into contexts, dropping the ragged tail. With ``prepend_bos=True`` every context starts
with BOS (counted in ``context_size``).

Sources (the ``source`` argument of :func:`load_token_splits`):

* ``"embedded"`` (:data:`EMBEDDED_CORPUS`) — English text that ships with every CPython 3.11:
  the help topics of ``pydoc_data.topics`` and the docstrings of a fixed list of pure,
  cross-platform standard-library modules. Works offline, on any machine, reproducibly.
* a local path — a ``.txt`` file (one document), a ``.jsonl``/``.json`` or ``.parquet`` file
  (one document per record, text column auto-detected or ``text_column=``), a directory of
  such files (read recursively in sorted order), or a ``datasets.save_to_disk`` directory.
  A table with an ``input_ids`` or ``tokens`` column of int lists is *already tokenized* and
  used as is (re-packed when its rows are not ``context_size`` long).
* anything else — a Hugging Face hub dataset name, streamed, reading only as many documents
  as ``max_tokens`` needs. Fails fast (one probe, no retries) when the hub is unreachable.

The held-out split is made per *context*, after packing: contexts are disjoint token ranges,
so train and test never share a token position. Context ``i`` is a test context iff
``floor(a + (i + 1) f) > floor(a + i f)`` for test fraction ``f`` and a phase ``a`` derived
from ``seed``: an evenly spread, deterministic choice of about ``f * n`` contexts that
depends only on ``i``. Because packing is deterministic too, loading fewer tokens
(``max_tokens``) gives a prefix of the same contexts with the same assignment, so an
analysis run on a smaller budget never evaluates on a model's training tokens.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.errors import MLSAEError

logger = logging.getLogger(__name__)

EMBEDDED_CORPUS = "embedded"

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES
# Columns that hold already-tokenized rows, in order of preference.
TOKEN_COLUMNS = ("input_ids", "tokens")
# Columns tried, in order, when the text column is not given.
TEXT_COLUMN_GUESSES = ("text", "content", "document")

# Modules whose docstrings form the embedded corpus. Pure, side-effect-free, and defined the
# same way on every platform and build of CPython 3.11 (no OS-specific modules such as os,
# socket or subprocess, no optional system libraries such as tkinter, curses or sqlite3, no
# modules with a pure-Python fallback of different text such as hashlib or zoneinfo, and no
# modules that warn on import). Kept sorted so the corpus order is fixed.
EMBEDDED_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        abc argparse array ast asyncio.base_events asyncio.events asyncio.futures
        asyncio.locks asyncio.protocols asyncio.queues asyncio.runners asyncio.streams
        asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.timeouts
        asyncio.transports atexit base64 bdb bisect builtins calendar cmath cmd code
        codecs codeop collections collections.abc colorsys compileall concurrent.futures
        configparser contextlib contextvars copy copyreg csv dataclasses datetime
        decimal difflib dis doctest email email.charset email.contentmanager
        email.feedparser email.generator email.header email.headerregistry email.message
        email.mime.multipart email.mime.text email.parser email.policy email.utils enum
        filecmp fileinput fnmatch fractions ftplib functools gc getopt gettext glob
        graphlib gzip heapq hmac html html.parser http http.client http.cookiejar
        http.cookies http.server imaplib importlib importlib.abc importlib.machinery
        importlib.metadata importlib.resources importlib.util inspect io ipaddress
        itertools json json.decoder json.encoder keyword linecache logging
        logging.config logging.handlers mailbox marshal math mimetypes modulefinder
        netrc numbers operator optparse pathlib pdb pickle pickletools pkgutil plistlib
        poplib pprint profile pstats py_compile pyclbr pydoc queue quopri random re
        reprlib runpy sched secrets shelve shlex smtplib socketserver statistics string
        stringprep struct symtable sysconfig tabnanny tarfile textwrap threading timeit
        token tokenize tomllib trace traceback tracemalloc types typing unicodedata
        unittest unittest.case unittest.loader unittest.mock unittest.result
        unittest.runner unittest.suite urllib.error urllib.parse urllib.request
        urllib.response urllib.robotparser uuid warnings wave weakref wsgiref.handlers
        wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom
        xml.dom.minidom xml.dom.pulldom xml.etree.ElementPath xml.etree.ElementTree
        xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
        xmlrpc.server zipapp zipfile zipimport
        """.split()  # noqa: SIM905 - a word list reads better than 190 lines
    )
)

_TOKENIZE_BATCH = 256  # documents per fast-tokenizer call
_HUB_PROBE_TIMEOUT_S = 5.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass
class TokenSplits:
    """Packed train and test contexts of one corpus.

    Attributes:
        train: ``[n_train, context_size]`` token ids, in corpus order (shuffle when training).
        test: ``[n_test, context_size]`` token ids, disjoint from ``train``.
        provenance: JSON-able record of how the tokens were made (source, sizes, tokenizer,
            split parameters and sha256 of both tensors), to store next to results.
    """

    train: Tensor
    test: Tensor
    provenance: dict[str, Any]


# --------------------------------------------------------------------------------------
# Pure tensor math
# --------------------------------------------------------------------------------------


def join_documents(documents: Iterable[Sequence[int]], eos_id: int) -> Tensor:
    """Concatenate tokenized documents with ``eos_id`` between consecutive documents.

    Args:
        documents: Token ids of each document, in order.
        eos_id: Separator id (the tokenizer's EOS).

    Returns:
        1-D LongTensor stream ``doc0 EOS doc1 EOS ... docN``.
    """
    pieces: list[Tensor] = []
    separator = torch.tensor([eos_id], dtype=torch.long)
    for i, ids in enumerate(documents):
        if i:
            pieces.append(separator)
        pieces.append(torch.as_tensor(ids, dtype=torch.long).reshape(-1))
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(pieces)


def pack_stream(
    stream: Tensor, context_size: int, bos_id: int | None = None, max_contexts: int | None = None
) -> Tensor:
    """Cut a 1-D token stream into rows of ``context_size``, dropping the ragged tail.

    Args:
        stream: 1-D token ids.
        context_size: Tokens per row, including the BOS when ``bos_id`` is given.
        bos_id: If given, every row is ``[bos_id] + context_size - 1 stream tokens``.
        max_contexts: Keep at most this many rows (a prefix of the stream).

    Returns:
        ``[n_contexts, context_size]`` LongTensor (``n_contexts`` may be 0).
    """
    body = context_size - (1 if bos_id is not None else 0)
    n = stream.numel() // body
    if max_contexts is not None:
        n = min(n, max_contexts)
    rows = stream[: n * body].reshape(n, body).long()
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


def held_out_mask(n_contexts: int, test_fraction: float, seed: int = 0) -> Tensor:
    """Which contexts are held out: an evenly spread, prefix-stable choice.

    Context ``i`` is held out iff ``floor(a + (i+1) f) > floor(a + i f)``, ``a`` being a
    phase in ``[0, 1)`` picked by ``seed``. Whether ``i`` is held out does not depend on
    ``n_contexts``, so a smaller budget selects a prefix of the same split; the count is
    ``floor(a + n f)``, i.e. ``floor(n f)`` or one more.

    Args:
        n_contexts: Number of packed contexts.
        test_fraction: Fraction held out, in (0, 1).
        seed: Picks the phase; seed 0 has phase 0.

    Returns:
        ``[n_contexts]`` BoolTensor, True for test contexts.
    """
    phase = (seed * _GOLDEN) % 1.0
    index = torch.arange(n_contexts, dtype=torch.float64)
    return torch.floor(phase + (index + 1) * test_fraction) > torch.floor(
        phase + index * test_fraction
    )


def split_contexts(contexts: Tensor, test_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split packed contexts into (train, test) rows by :func:`held_out_mask`.

    Rows keep their corpus order. Each row is a disjoint token range, so the two parts never
    share a token position.
    """
    is_test = held_out_mask(contexts.shape[0], test_fraction, seed).to(contexts.device)
    return contexts[~is_test], contexts[is_test]


def special_token_ids(tokenizer: Any) -> list[int]:
    """The BOS, EOS, PAD and UNK ids the tokenizer defines, deduplicated, in that order.

    These positions carry no content (separators, padding), so training and statistics
    mask them out.
    """
    ids: list[int] = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def special_token_mask(tokens: Tensor, tokenizer_or_ids: Any) -> Tensor:
    """Mark the positions of ``tokens`` that hold a special token.

    Args:
        tokens: Token ids of any shape.
        tokenizer_or_ids: A tokenizer (its :func:`special_token_ids` are used) or an
            iterable of ids.

    Returns:
        BoolTensor shaped like ``tokens``, True at special-token positions.
    """
    if isinstance(tokenizer_or_ids, Tensor):
        ids = tokenizer_or_ids.reshape(-1).long()
    elif isinstance(tokenizer_or_ids, Iterable) and not isinstance(tokenizer_or_ids, str | bytes):
        ids = torch.tensor([int(i) for i in tokenizer_or_ids], dtype=torch.long)
    else:
        ids = torch.tensor(special_token_ids(tokenizer_or_ids), dtype=torch.long)
    return torch.isin(tokens, ids.to(tokens.device))


def tensor_sha256(tokens: Tensor) -> str:
    """sha256 of the int64 little-endian bytes of ``tokens`` (shape not included)."""
    array = tokens.detach().cpu().long().contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(array.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------
# The embedded corpus
# --------------------------------------------------------------------------------------


def _is_documented_member(obj: Any) -> bool:
    return inspect.isroutine(obj) or isinstance(obj, property | classmethod | staticmethod)


def _module_docstrings(name: str) -> Iterator[str | None]:
    """Docstrings of a module, its public classes and functions, and their members."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - a missing module only shrinks the corpus
        logger.info("Embedded corpus: skipping %s (%s)", name, error)
        return
    yield inspect.getdoc(module)
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        yield inspect.getdoc(obj)
        if not inspect.isclass(obj):
            continue
        for member, raw in sorted(vars(obj).items()):
            if (member.startswith("_") and member != "__init__") or not _is_documented_member(raw):
                continue
            try:
                yield inspect.getdoc(getattr(obj, member))
            except Exception as error:  # noqa: BLE001 - odd descriptors: skip, never fail
                logger.debug(
                    "Embedded corpus: skipping %s.%s (%s)", obj.__qualname__, member, error
                )


@cache
def embedded_documents() -> tuple[str, ...]:
    """The documents of the embedded corpus, in a fixed order.

    First every ``pydoc_data.topics`` help text (sorted by topic), then, for each module of
    :data:`EMBEDDED_MODULES`, the module docstring and the docstrings of its public classes
    and functions defined in that module (sorted by name), each class followed by its
    methods' and properties' docstrings. Exact duplicates keep their first occurrence.
    Modules that fail to import are skipped (logged), so a stripped-down build gives a
    smaller corpus rather than an error.
    """
    from pydoc_data.topics import topics

    if sys.flags.optimize >= 2:
        logger.warning(
            "Python runs with -OO, so docstrings are stripped: the embedded corpus "
            "holds only the pydoc help topics."
        )
    documents: list[str] = []
    seen: set[str] = set()

    def add(doc: str | None) -> None:
        if doc and doc.strip() and doc not in seen:
            seen.add(doc)
            documents.append(doc)

    for key in sorted(topics):
        add(topics[key])
    with warnings.catch_warnings():  # deprecated modules and aliases (typing.io) warn on access
        warnings.simplefilter("ignore")
        for name in EMBEDDED_MODULES:
            for doc in _module_docstrings(name):
                add(doc)
    return tuple(documents)


@cache
def _embedded_sha256() -> str:
    """Fingerprint of the embedded text, which varies with the Python patch version."""
    digest = hashlib.sha256()
    for document in embedded_documents():
        digest.update(document.encode("utf-8") + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def _looks_local(source: str) -> bool:
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
        return _guess_text_column(self.columns, self.is_string, str(self.path))


def _guess_text_column(columns: list[str], is_string: dict[str, bool], where: str) -> str:
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


def _local_tables(path: Path) -> list[_Table] | None:
    """Tables of a local source, or None when it is plain text (.txt files)."""
    if _is_saved_dataset(path):
        return [_Table(path)]
    files = _local_files(path)
    if any(f.suffix.lower() in TEXT_SUFFIXES for f in files):
        return None
    return [_Table(f) for f in files]


def _iter_local_documents(path: Path, text_column: str | None) -> Iterator[str]:
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


def _iter_token_rows(tables: list[_Table], vocab_size: int) -> Iterator[list[int]]:
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


# --------------------------------------------------------------------------------------
# Hugging Face hub
# --------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_error(name: str, why: str) -> MLSAEError:
    return MLSAEError(
        f"Cannot stream {name!r} from the Hugging Face hub: {why}. Use the offline corpus "
        f"{EMBEDDED_CORPUS!r} or a local .txt/.jsonl/.parquet file instead (if {name!r} was "
        "meant as a local path, it does not exist)."
    )


def _check_hub_reachable(name: str) -> None:
    """Fail fast when offline instead of waiting through the hub client's retries."""
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if _env_flag(flag):
            raise _hub_error(name, f"{flag} is set, so the hub is off")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        request = urllib.request.Request(endpoint, method="HEAD")
        urllib.request.urlopen(request, timeout=_HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # the server answered: reachable
    except (OSError, ValueError) as error:
        raise _hub_error(name, f"{endpoint} is unreachable ({error})") from None


def _iter_hub_documents(name: str, text_column: str | None) -> Iterator[str]:
    import datasets

    _check_hub_reachable(name)
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
        iterator = iter(stream)
        first = next(iterator, None)
    except Exception as error:  # noqa: BLE001 - network, auth, missing dataset: all user-fixable
        raise _hub_error(name, f"{type(error).__name__}: {error}") from None
    if first is None:
        raise _hub_error(name, "its train split is empty")
    columns = list(first)
    if text_column is None:
        text_column = _guess_text_column(
            columns, {c: isinstance(v, str) for c, v in first.items()}, name
        )
    elif text_column not in columns:
        raise MLSAEError(
            f"Column {text_column!r} not found in {name}; columns found: {columns}. Pass one of "
            "them with --text-column."
        )
    for example in itertools.chain([first], iterator):
        value = example[text_column]
        if isinstance(value, str):
            yield value


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def _source_kind(source: str) -> str:
    if source == EMBEDDED_CORPUS:
        return "embedded"
    if Path(source).expanduser().exists():
        return "local"
    if _looks_local(source):
        raise MLSAEError(
            f"Corpus file not found: {source}. Pass an existing .txt/.jsonl/.json/.parquet file "
            f"or directory, a Hugging Face dataset name, or {EMBEDDED_CORPUS!r}."
        )
    return "hub"


def iter_documents(source: str = EMBEDDED_CORPUS, text_column: str | None = None) -> Iterator[str]:
    """Yield the text documents of a source, in its fixed order.

    Args:
        source: ``"embedded"``, a local path, or a hub dataset name (streamed, lazily).
        text_column: Column holding the text in tables; guessed when None.

    Raises:
        MLSAEError: The source is missing, unreadable, empty, has no text column, or is a
            hub dataset while the hub is unreachable.
    """
    kind = _source_kind(source)
    if kind == "embedded":
        yield from embedded_documents()
    elif kind == "local":
        yield from _iter_local_documents(Path(source).expanduser(), text_column)
    else:
        yield from _iter_hub_documents(source, text_column)


def _tokenize_until(
    documents: Iterable[str], tokenizer: Any, max_stream_tokens: int | None
) -> tuple[list[list[int]], int]:
    """Tokenize documents in batches until the joined stream would reach the budget.

    Returns:
        The token lists and how many stream tokens (documents plus separators) they make.
    """
    tokenized: list[list[int]] = []
    n_stream = 0
    iterator = iter(documents)
    while max_stream_tokens is None or n_stream < max_stream_tokens:
        batch = list(itertools.islice(iterator, _TOKENIZE_BATCH))
        if not batch:
            break
        encoded = tokenizer(
            batch, add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        for ids in encoded:
            n_stream += len(ids) + (1 if tokenized else 0)
            tokenized.append(ids)
            if max_stream_tokens is not None and n_stream >= max_stream_tokens:
                break
    return tokenized, n_stream


def _resolve_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise MLSAEError(
            "No tokenizer given. Pass the model's tokenizer (e.g. model.tokenizer) as tokenizer=."
        )
    if isinstance(tokenizer, str | os.PathLike):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        except Exception as error:  # noqa: BLE001
            raise MLSAEError(
                f"Could not load tokenizer {tokenizer!r} ({error}). Pass a local tokenizer "
                "folder or a tokenizer object."
            ) from None
    return tokenizer


def _validate(context_size: int, test_fraction: float, max_tokens: int | None) -> None:
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 2:
        raise MLSAEError(
            f"context_size must be an integer of at least 2, got {context_size!r}. Use e.g. "
            "--context-size 128."
        )
    if not isinstance(test_fraction, int | float) or not 0.0 < test_fraction < 1.0:
        raise MLSAEError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}. Use e.g. "
            "--test-fraction 0.1."
        )
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < context_size
    ):
        raise MLSAEError(
            f"max_tokens must be at least one context ({context_size} tokens), got "
            f"{max_tokens!r}. Raise --max-tokens or lower --context-size."
        )


def load_token_splits(
    source: str = EMBEDDED_CORPUS,
    tokenizer: Any = None,
    context_size: int = 128,
    test_fraction: float = 0.1,
    max_tokens: int | None = None,
    seed: int = 0,
    text_column: str | None = None,
    prepend_bos: bool = False,
) -> TokenSplits:
    """Tokenize, pack and split a corpus into train and held-out test contexts.

    Args:
        source: ``"embedded"``, a local path, or a hub dataset name.
        tokenizer: The model's Hugging Face tokenizer (or a local tokenizer folder).
        context_size: Tokens per context (including BOS when ``prepend_bos``).
        test_fraction: Fraction of contexts held out, in (0, 1).
        max_tokens: Use at most this many tokens (``max_tokens // context_size`` contexts);
            required for hub datasets, which are streamed. None uses the whole source.
        seed: Picks which evenly spread contexts are held out (see :func:`held_out_mask`).
        text_column: Column holding text in tables; guessed when None. Tables with an
            ``input_ids``/``tokens`` column are read as token ids unless this is given.
        prepend_bos: Start every context with the tokenizer's BOS.

    Returns:
        :class:`TokenSplits` with disjoint ``train`` and ``test`` contexts and provenance.

    Raises:
        MLSAEError: For any bad source or parameter, with the fix in the message.
    """
    _validate(context_size, test_fraction, max_tokens)
    tokenizer = _resolve_tokenizer(tokenizer)
    kind = _source_kind(source)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    bos_id = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    if prepend_bos and bos_id is None:
        raise MLSAEError(
            "prepend_bos=True but the tokenizer has no BOS token. Use prepend_bos=False."
        )
    if kind == "hub" and max_tokens is None:
        raise MLSAEError(
            f"Hub dataset {source!r} is streamed, so it needs a token budget. Pass max_tokens "
            "(--max-tokens)."
        )
    max_contexts = None if max_tokens is None else max_tokens // context_size
    body = context_size - (1 if bos_id is not None else 0)

    tables = _local_tables(Path(source).expanduser()) if kind == "local" else None
    pretokenized = (
        tables is not None
        and text_column is None
        and all(t.token_column() is not None for t in tables)
    )
    if pretokenized:
        assert tables is not None
        contexts, n_documents, n_corpus_tokens = _pack_token_rows(
            _iter_token_rows(tables, len(tokenizer)), context_size, bos_id, max_contexts
        )
    else:
        if eos_id is None:
            raise MLSAEError(
                "The tokenizer has no EOS token to separate documents. Set tokenizer.eos_token "
                "or use a tokenizer that defines one."
            )
        budget = None if max_contexts is None else max_contexts * body
        tokenized, n_corpus_tokens = _tokenize_until(
            iter_documents(source, text_column), tokenizer, budget
        )
        n_documents = len(tokenized)
        contexts = pack_stream(
            join_documents(tokenized, eos_id), context_size, bos_id, max_contexts
        )

    if contexts.shape[0] == 0:
        raise MLSAEError(
            f"Corpus {source!r} has {n_corpus_tokens} tokens, fewer than one context of "
            f"{context_size}. Use a smaller --context-size or more text."
        )
    train, test = split_contexts(contexts, test_fraction, seed)
    n_train, n_test = train.shape[0], test.shape[0]
    if n_test < 1 or n_train < 1:
        needed = math.ceil(1 / min(test_fraction, 1 - test_fraction))
        raise MLSAEError(
            f"Corpus {source!r} gives {contexts.shape[0]} contexts of {context_size} tokens: "
            f"{n_train} train and {n_test} test at test_fraction={test_fraction}. At least one "
            f"of each is needed (about {needed} contexts). Use more text, a smaller "
            "--context-size or a different --test-fraction."
        )
    provenance = {
        "source": source,
        "source_kind": kind,
        "pretokenized": pretokenized,
        "text_column": text_column,
        "n_documents": n_documents,
        "n_corpus_tokens": n_corpus_tokens,
        "n_tokens": int(contexts.numel()),
        "n_contexts": int(contexts.shape[0]),
        "n_train": n_train,
        "n_test": n_test,
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        "max_tokens": max_tokens,
        "test_fraction": test_fraction,
        "seed": seed,
        "split": "interleaved: context i is test iff floor(a+(i+1)f) > floor(a+if)",
        "tokenizer": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "vocab_size": len(tokenizer),
        "eos_token_id": eos_id,
        "bos_token_id": bos_id,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "embedded_sha256": _embedded_sha256() if kind == "embedded" else None,
        "train_sha256": tensor_sha256(train),
        "test_sha256": tensor_sha256(test),
    }
    logger.info(
        "Corpus %r: %d documents, %d tokens -> %d train + %d test contexts of %d",
        source,
        n_documents,
        n_corpus_tokens,
        n_train,
        n_test,
        context_size,
    )
    return TokenSplits(train=train, test=test, provenance=provenance)


def _pack_token_rows(
    rows: Iterable[list[int]], context_size: int, bos_id: int | None, max_contexts: int | None
) -> tuple[Tensor, int, int]:
    """Pack already-tokenized rows: as-is when they already are contexts, else re-packed.

    Rows are joined end to end exactly as stored (they carry their own separators). When
    re-packing with a BOS, a BOS that starts a stored row is dropped, since every new context
    gets its own.

    Returns:
        Contexts, the number of rows read, and the number of tokens read.
    """
    body = context_size - (1 if bos_id is not None else 0)
    kept: list[list[int]] = []
    n_tokens = n_body = 0
    for row in rows:
        kept.append(row)
        n_tokens += len(row)
        n_body += len(row) - (1 if bos_id is not None and row and row[0] == bos_id else 0)
        if max_contexts is not None and n_body >= max_contexts * body:
            break
    as_is = all(len(r) == context_size for r in kept) and (
        bos_id is None or all(r[0] == bos_id for r in kept)
    )
    if as_is and kept:
        contexts = torch.tensor(kept, dtype=torch.long)
        if max_contexts is not None:
            contexts = contexts[:max_contexts]
        return contexts, len(kept), n_tokens
    if bos_id is not None:
        kept = [r[1:] if r and r[0] == bos_id else r for r in kept]
    stream = torch.tensor(list(itertools.chain.from_iterable(kept)), dtype=torch.long)
    return pack_stream(stream, context_size, bos_id, max_contexts), len(kept), n_tokens
