"""Text documents to token ids with the model's tokenizer, stopping at the token budget.

Documents are tokenized in batches without special tokens (packing adds the separators), and
only as many as the budget needs, so a streamed hub dataset is read no further.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Any

from mlsae_lens.errors import MLSAEError

_TOKENIZE_BATCH = 256  # documents per fast-tokenizer call


def tokenize_until(
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


def resolve_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer object: loaded when given as a local folder or name, refused when None."""
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
