"""Packing token streams into fixed-length contexts, and the prefix-stable train/test split.

Pure tensor math, no tokenizer and no files: documents joined with EOS *between* them, the
stream cut into ``context_size`` rows (the ragged tail dropped, an optional BOS counted in the
row), and the per-context held-out choice. Both are deterministic and depend only on a row's
position, which is what makes a smaller token budget select a prefix of the same split, so
the split hashes recorded in old runs stay valid.

Why not SAELens' ``concat_and_batch_sequences`` (its packer): it inserts the separator only
inside a row, so a document that ends exactly on a row boundary loses its EOS (the next row
starts with the next document), it skips empty documents (we keep their EOS), and it puts no
BOS before a row whose first token already is BOS. On the embedded corpus the first case
alone drops 17 separators at ``context_size=16`` (21,918 contexts instead of 21,935) and
shifts every row from the first one (row 523) on, so the split hashes of existing runs would
no longer match; it is also 1.6-9x slower there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


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


def pack_token_rows(
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
