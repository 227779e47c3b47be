"""Everything that needs TransformerLens' ``HookedTransformer``: one file to change for TL 4.

TransformerLens 3.9 deprecates ``HookedTransformer`` and TransformerLens 4 removes it (with
``HookedTransformerConfig`` and ``components``); :mod:`mlsae_lens.bridge` is the path that
survives. This backend stays selectable (``--model-backend hooked``) because SAELens 6.54 still
builds on it in places:

* ``sae_lens.HookedSAETransformer`` subclasses ``HookedTransformer`` (its bridge counterpart,
  ``SAETransformerBridge``, is marked beta);
* ``LanguageModelSAERunnerConfig`` / ``ActivationsStore`` load models with
  ``HookedTransformer.from_pretrained`` unless given ``override_model``;
* ``sae_lens.evals`` type its model as ``HookedRootModule`` and call ``run_with_cache`` with
  ``stop_at_layer`` (both exist on the bridge too).

Models built here keep the residual stream equal to the Hugging Face hidden states: layer norms
are folded (exact), but writing weights and the unembedding are *not* centred. Centring changes
each ``hook_resid_post`` vector by its mean, which MLSAE statistics would silently absorb.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
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

from mlsae_lens import sources
from mlsae_lens.errors import MLSAEError
from mlsae_lens.sources import (
    EMBEDDED_MODEL_NAME,
    INSTALL_HINT,
    checked_cache_writer,
    hub_failure,
    hub_offline_mode,
    hub_reachable,
    offline_requested,
    verify_checksums,
)

logger = logging.getLogger(__name__)

# Bump when the cache layout or the processing below changes, so old caches are not reused.
CACHE_FORMAT_VERSION = 2
STATE_DICT_FILE = "state_dict.safetensors"
CONFIG_FILE = "tl_config.json"

# Processing applied to every converted state dict (see module docstring for why).
FOLD_LN = True  # exact: norm scales move into the next linear layer
CENTER_WRITING_WEIGHTS = False  # would shift every resid_post vector by its mean
CENTER_UNEMBED = False  # would shift logits by a per-position constant
FOLD_VALUE_BIASES = True  # only moves b_V into b_O; the residual stream is unchanged


def model_class(sae_transformer: bool) -> type[HookedTransformer]:
    """``HookedSAETransformer`` (SAELens' ``run_with_saes``) or the plain ``HookedTransformer``."""
    if sae_transformer:
        from sae_lens import HookedSAETransformer

        return HookedSAETransformer
    return HookedTransformer


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
    sae_transformer: bool = False,
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
        sae_transformer: build SAELens' ``HookedSAETransformer`` (adds ``run_with_saes``).

    Raises:
        ValueError: the state dict is missing weights or has unexpected ones.
    """
    cfg = copy.deepcopy(cfg)
    if tokenizer is None:
        cfg.tokenizer_name = None
    with _quiet_deprecations():
        model = model_class(sae_transformer)(cfg, tokenizer)
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



def embedded_cache_dir() -> Path:
    """Cache folder of the embedded model as processed TransformerLens weights."""
    return sources.embedded_cache_dir("", CACHE_FORMAT_VERSION, "transformer-lens")


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
    """Write processed weights, config, tokenizer and their checksums into ``cache_dir``
    atomically (a temporary folder renamed into place).

    The weights are saved *after* TransformerLens' processing (layer norms folded), with the
    config saying so (``RMSPre``): TL's ``load_and_process_state_dict`` loads one key at a time
    and takes ~10 s here, while processed weights load in one ``load_state_dict`` call.
    """
    try:
        with checked_cache_writer(cache_dir) as tmp:
            tensors = {
                name: param.detach().to("cpu", torch.float32).contiguous()
                for name, param in model.named_parameters()
            }
            save_file(tensors, tmp / STATE_DICT_FILE)
            config = {**config, "normalization_type": model.cfg.normalization_type}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
            model.tokenizer.save_pretrained(tmp)
        logger.info("cached converted %s weights in %s", EMBEDDED_MODEL_NAME, cache_dir)
    except OSError as err:
        # A read-only or full disk should not stop the load; the next load simply rebuilds.
        logger.warning("could not write the model cache %s (%s); continuing", cache_dir, err)


def read_checked_cache(cache_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """Config, state dict and tokenizer from ``cache_dir`` after verifying every checksum.

    Raises:
        ValueError: a file is missing, unreadable or differs from its recorded checksum; only
            then is the cache bad (errors from the caller's arguments come later, elsewhere).
    """
    from transformers import AutoTokenizer

    verify_checksums(cache_dir)
    try:
        config = json.loads((cache_dir / CONFIG_FILE).read_text())
        state_dict = load_file(cache_dir / STATE_DICT_FILE)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise ValueError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return config, state_dict, tokenizer


def _model_from_cache(
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    device: str,
    dtype: torch.dtype,
    sae_transformer: bool,
) -> HookedTransformer:
    """Build the embedded model from verified cache contents.

    The model is created directly in ``dtype`` and the float32 weights are cast while loading
    (TransformerLens' ``model.to(dtype)`` walks every submodule and takes ~8 s here).
    """
    cfg = HookedTransformerConfig.from_dict({**config, "device": device, "dtype": dtype})
    with _quiet_deprecations():
        model = model_class(sae_transformer)(cfg, tokenizer)
    _check_keys(model, state_dict)
    model.load_state_dict(state_dict, strict=False)  # strict=False: buffers are not saved
    _keep_original_tokenizer(model, tokenizer)
    return model.eval()


def _build_and_cache(cache_dir: Path, device: str, sae_transformer: bool) -> HookedTransformer:
    """Load the GGUF, convert it with TransformerLens, and cache the result."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from mlsae_lens import sources

    hf_model, tokenizer = sources.load_embedded_hf_model(torch.float32)
    config = _smollm2_config_dict(hf_model.config)
    cfg = HookedTransformerConfig.from_dict({**config, "device": device})
    with torch.no_grad():
        state_dict = convert_llama_weights(hf_model, cfg)
    del hf_model
    model = hooked_transformer_from_state_dict(cfg, state_dict, tokenizer, sae_transformer)
    _keep_original_tokenizer(model, tokenizer)
    _write_cache(cache_dir, model, config)
    return model


def load_embedded(
    device: str, dtype: torch.dtype, sae_transformer: bool = False
) -> HookedTransformer:
    """The embedded model from the cache if it is intact, else from the GGUF (rebuilding it).

    The cache is deleted only when it is proven bad (a missing file, an unreadable file or a
    checksum mismatch): an error from ``device`` or ``dtype`` leaves it alone.
    """
    cache_dir = embedded_cache_dir()
    if cache_dir.exists():
        try:
            contents = read_checked_cache(cache_dir)
        except ValueError as err:
            logger.warning("model cache %s is bad (%s); rebuilding it", cache_dir, err)
            shutil.rmtree(cache_dir, ignore_errors=True)
        else:
            model = _model_from_cache(*contents, device, dtype, sae_transformer)
            logger.info("loaded %s from cache %s", EMBEDDED_MODEL_NAME, cache_dir)
            return model
    model = _build_and_cache(cache_dir, device, sae_transformer)
    if dtype != model.cfg.dtype:  # processed in float32 first, as TransformerLens advises
        model = model.to(dtype, print_details=False)
    return model


def load_from_hub(
    name: str, device: str, dtype: torch.dtype, sae_transformer: bool = False
) -> tuple[HookedTransformer, str]:
    """``HookedTransformer.from_pretrained`` with our processing and clear errors.

    Fails fast without a network: offline mode (``HF_HUB_OFFLINE``) or a failed 3 s probe of
    the hub switch huggingface_hub to its local cache, instead of retrying each file for ~25 s.

    Returns:
        The model and its official TransformerLens name.
    """
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise MLSAEError(
            f"unknown model name {name!r} for --model-backend hooked; use a TransformerLens "
            "model name such as pythia-70m-deduped, --model-backend bridge for any Hugging Face "
            f"causal LM, or the embedded default {EMBEDDED_MODEL_NAME}, which works offline"
        ) from None
    requested = offline_requested()
    reachable = not requested and hub_reachable()
    try:
        with hub_offline_mode(not reachable), _quiet_deprecations():
            model = model_class(sae_transformer).from_pretrained(
                official,
                fold_ln=FOLD_LN,
                center_writing_weights=CENTER_WRITING_WEIGHTS,
                center_unembed=CENTER_UNEMBED,
                fold_value_biases=FOLD_VALUE_BIASES,
                device=device,
                dtype=torch.float32,  # process in float32, cast below (as TL advises)
            )
    except OSError as err:  # includes ConnectionError and huggingface_hub's HTTP/cache errors
        raise hub_failure(name, err, requested, reachable) from err
    if dtype != torch.float32:
        model = model.to(dtype, print_details=False)
    return model.eval(), official
