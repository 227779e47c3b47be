"""Hugging Face hub datasets, streamed: only as many documents as the token budget needs.

The hub client retries for minutes when offline, so one short probe (or an offline flag)
fails first with one line that points to the embedded corpus or a local file.
"""

from __future__ import annotations

import itertools
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

from mlsae_lens.data.embedded import EMBEDDED_CORPUS
from mlsae_lens.data.local import guess_text_column
from mlsae_lens.errors import MLSAEError

_HUB_PROBE_TIMEOUT_S = 5.0


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


def iter_hub_documents(name: str, text_column: str | None) -> Iterator[str]:
    """Stream the text documents of a hub dataset's train split, lazily."""
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
        text_column = guess_text_column(
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
