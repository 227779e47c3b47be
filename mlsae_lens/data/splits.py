"""A corpus tokenized, packed and split into train and test contexts, with its provenance.

:func:`load_token_splits` is the one entry point: it checks the parameters, reads the source
(:mod:`~mlsae_lens.data.documents`), tokenizes (:mod:`~mlsae_lens.data.tokenization`) or takes
already-tokenized rows, packs (:mod:`~mlsae_lens.data.packing`) and splits. The provenance
records the sha256 of both splits so a later run can refuse tokens that differ.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mlsae_lens.data.documents import iter_documents, source_kind
from mlsae_lens.data.embedded import EMBEDDED_CORPUS, embedded_sha256
from mlsae_lens.data.local import iter_token_rows, local_tables
from mlsae_lens.data.packing import join_documents, pack_stream, pack_token_rows, split_contexts
from mlsae_lens.data.tokenization import resolve_tokenizer, tokenize_until
from mlsae_lens.errors import MLSAEError

logger = logging.getLogger(__name__)


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


def tensor_sha256(tokens: Tensor) -> str:
    """sha256 of the int64 little-endian bytes of ``tokens`` (shape not included)."""
    array = tokens.detach().cpu().long().contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(array.tobytes()).hexdigest()


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
        seed: Picks which evenly spread contexts are held out (see
            :func:`~mlsae_lens.data.packing.held_out_mask`).
        text_column: Column holding text in tables; guessed when None. Tables with an
            ``input_ids``/``tokens`` column are read as token ids unless this is given.
        prepend_bos: Start every context with the tokenizer's BOS.

    Returns:
        :class:`TokenSplits` with disjoint ``train`` and ``test`` contexts and provenance.

    Raises:
        MLSAEError: For any bad source or parameter, with the fix in the message.
    """
    _validate(context_size, test_fraction, max_tokens)
    tokenizer = resolve_tokenizer(tokenizer)
    kind = source_kind(source)
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

    tables = local_tables(Path(source).expanduser()) if kind == "local" else None
    pretokenized = (
        tables is not None
        and text_column is None
        and all(t.token_column() is not None for t in tables)
    )
    if pretokenized:
        assert tables is not None
        contexts, n_documents, n_corpus_tokens = pack_token_rows(
            iter_token_rows(tables, len(tokenizer)), context_size, bos_id, max_contexts
        )
    else:
        if eos_id is None:
            raise MLSAEError(
                "The tokenizer has no EOS token to separate documents. Set tokenizer.eos_token "
                "or use a tokenizer that defines one."
            )
        budget = None if max_contexts is None else max_contexts * body
        tokenized, n_corpus_tokens = tokenize_until(
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
        "embedded_sha256": embedded_sha256() if kind == "embedded" else None,
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
