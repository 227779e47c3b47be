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

Modules, in the order data flows: :mod:`~mlsae_lens.data.embedded`,
:mod:`~mlsae_lens.data.local` and :mod:`~mlsae_lens.data.hub` (the sources),
:mod:`~mlsae_lens.data.documents` (which source a name means),
:mod:`~mlsae_lens.data.tokenization`, :mod:`~mlsae_lens.data.packing` (pure tensor math: packing
and the split), :mod:`~mlsae_lens.data.special_tokens`, and :mod:`~mlsae_lens.data.splits`
(:func:`load_token_splits`, the entry point). This package re-exports their public names.
"""

from mlsae_lens.data.documents import iter_documents
from mlsae_lens.data.embedded import EMBEDDED_CORPUS, EMBEDDED_MODULES, embedded_documents
from mlsae_lens.data.local import (
    SUPPORTED_SUFFIXES,
    TABLE_SUFFIXES,
    TEXT_COLUMN_GUESSES,
    TEXT_SUFFIXES,
    TOKEN_COLUMNS,
)
from mlsae_lens.data.packing import held_out_mask, join_documents, pack_stream, split_contexts
from mlsae_lens.data.special_tokens import special_token_ids, special_token_mask
from mlsae_lens.data.splits import TokenSplits, load_token_splits, tensor_sha256

__all__ = [
    "EMBEDDED_CORPUS",
    "EMBEDDED_MODULES",
    "SUPPORTED_SUFFIXES",
    "TABLE_SUFFIXES",
    "TEXT_COLUMN_GUESSES",
    "TEXT_SUFFIXES",
    "TOKEN_COLUMNS",
    "TokenSplits",
    "embedded_documents",
    "held_out_mask",
    "iter_documents",
    "join_documents",
    "load_token_splits",
    "pack_stream",
    "special_token_ids",
    "special_token_mask",
    "split_contexts",
    "tensor_sha256",
]
