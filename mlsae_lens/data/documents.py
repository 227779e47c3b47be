"""Which kind of source a corpus name means, and its text documents in a fixed order.

``"embedded"`` is the embedded corpus; an existing path (or one that looks like a path) is
local; anything else is a hub dataset name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mlsae_lens.data.embedded import EMBEDDED_CORPUS, embedded_documents
from mlsae_lens.data.hub import iter_hub_documents
from mlsae_lens.data.local import iter_local_documents, looks_local
from mlsae_lens.errors import MLSAEError


def source_kind(source: str) -> str:
    """``"embedded"``, ``"local"`` or ``"hub"``; a path that does not exist is refused."""
    if source == EMBEDDED_CORPUS:
        return "embedded"
    if Path(source).expanduser().exists():
        return "local"
    if looks_local(source):
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
    kind = source_kind(source)
    if kind == "embedded":
        yield from embedded_documents()
    elif kind == "local":
        yield from iter_local_documents(Path(source).expanduser(), text_column)
    else:
        yield from iter_hub_documents(source, text_column)
