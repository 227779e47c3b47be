"""Which token ids carry no content, and where they sit in a batch of contexts.

BOS, EOS (our document separator), PAD and UNK hold no text, so training and every statistic
mask their positions out. Pure tensor math on ids taken from the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


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
