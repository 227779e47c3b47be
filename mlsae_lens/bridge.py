"""Any Hugging Face causal LM through TransformerLens' ``TransformerBridge`` (the TL 4 path).

The bridge wraps the Hugging Face model in place instead of reimplementing it, so its
``blocks.{l}.hook_resid_post`` *is* the Hugging Face residual stream (``hidden_states[l + 1]``,
except the last layer: Hugging Face applies the final norm to its last hidden state, the hook
reads the block output before it). A model comes from

* a local directory as written by ``save_pretrained`` (``config.json``, weights, tokenizer):
  no hub at all;
* a hub id (e.g. ``EleutherAI/pythia-70m-deduped``), failing at once with one line when
  the hub is unreachable and the model is not in the local cache;
* the embedded SmolLM2, whose GGUF is dequantized once and cached as such a directory.

Each bad input (no ``config.json``, not a causal LM, an architecture the bridge lacks, no
tokenizer, no weights) is one :class:`MLSAEError` line naming the problem and what works.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAETransformerBridge
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from mlsae_lens import sources
from mlsae_lens.errors import MLSAEError
from mlsae_lens.sources import (
    EMBEDDED_MODEL_NAME,
    hub_failure,
    hub_offline_mode,
    hub_reachable,
    offline_requested,
)

logger = logging.getLogger(__name__)

BRIDGE_CACHE_FORMAT_VERSION = 1
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a ``TransformerBridge`` (else a ``HookedTransformer``)."""
    return isinstance(model, TransformerBridge)


def supported_architectures() -> list[str]:
    """Causal-LM architectures TransformerLens' bridge has an adapter for (class names)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(a for a in SUPPORTED_ARCHITECTURES if a.endswith(CAUSAL_LM_SUFFIXES))


def _examples() -> str:
    known = supported_architectures()
    picks = [a for a in ("LlamaForCausalLM", "GPTNeoXForCausalLM", "GPT2LMHeadModel") if a in known]
    return f"{', '.join(picks)} and {len(known) - len(picks)} more"


def check_model_dir(path: Path) -> str:
    """The bridge architecture of the Hugging Face causal LM saved in ``path``.

    Raises:
        MLSAEError: no ``config.json``, not a causal LM, an unsupported architecture, no
            weights, or no tokenizer; each a single line with what is supported.
    """
    from transformer_lens.model_bridge.sources.transformers import (
        determine_architecture_from_hf_config,
    )
    from transformers import AutoConfig

    layout = "a directory written by save_pretrained (config.json, weights, tokenizer files)"
    if not (path / "config.json").is_file():
        raise MLSAEError(f"{path} has no config.json; pass {layout}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MLSAEError(f"cannot read {path / 'config.json'} ({first}); pass {layout}") from None
    # The class the directory was saved from; TransformerLens' guess from model_type otherwise.
    saved = getattr(config, "architectures", None) or []
    try:
        architecture = saved[0] if saved else determine_architecture_from_hf_config(config)
    except ValueError:
        architecture = config.model_type
    if not str(architecture).endswith(CAUSAL_LM_SUFFIXES):
        raise MLSAEError(
            f"{path} holds a {architecture}, not a causal language model; mlsae-lens reads the "
            f"residual stream of decoder-only causal LMs ({_examples()})"
        )
    if architecture not in supported_architectures():
        raise MLSAEError(
            f"{path} holds a {architecture}, which TransformerLens' TransformerBridge does not "
            f"support; supported causal LMs: {', '.join(supported_architectures())}"
        )
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise MLSAEError(
            f"{path} has no weights (*.safetensors or pytorch_model.bin); save the model with "
            "model.save_pretrained(path)"
        )
    return str(architecture)


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.debug("tokenizer load from %s failed: %s", path, err)
        raise MLSAEError(
            f"{path} has no loadable tokenizer; save it next to the weights with "
            "tokenizer.save_pretrained(path)"
        ) from None


class MLSAETransformerBridge(SAETransformerBridge):
    """SAELens' ``SAETransformerBridge`` (beta) that still answers to TransformerLens' alias names.

    SAELens 6.54 overrides ``hook_dict`` with the canonical names only (``blocks.{l}.hook_out``),
    so ``run_with_hooks`` / ``hooks`` silently ignore an alias such as
    ``blocks.{l}.hook_resid_post``, the name every MLSAE layer view and ``steering_hook`` use.
    This adds the aliases of plain hook points back; SAELens' own SAE hooks are unchanged.
    """

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        hooks = super().hook_dict
        aliases: dict[str, HookPoint] = {}
        self._add_aliases_to_hooks(aliases)
        hooks.update({k: v for k, v in aliases.items() if isinstance(v, HookPoint) and k not in hooks})
        return hooks


def _boot(
    name: str,
    hf_model: Any,
    tokenizer: Any,
    device: str,
    dtype: torch.dtype,
    sae_transformer: bool,
) -> TransformerBridge:
    """Wrap a loaded HF model (SAELens' ``SAETransformerBridge`` when ``sae_transformer``)."""
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    if sae_transformer:
        # The way SAELens' own SAETransformerBridge.boot_transformers makes one.
        bridge.__class__ = MLSAETransformerBridge
        bridge._acts_to_saes = {}  # type: ignore[attr-defined]
        bridge._transcoder_output_hooks = {}  # type: ignore[attr-defined]
    return bridge.eval()


def load_local(
    path: Path, device: str, dtype: torch.dtype, sae_transformer: bool = False
) -> TransformerBridge:
    """A bridge on the Hugging Face causal LM saved in ``path`` (no hub access)."""
    from transformers import AutoModelForCausalLM

    path = path.resolve()
    check_model_dir(path)
    tokenizer = _load_tokenizer(path)
    with hub_offline_mode(True):
        try:
            # eager attention: the bridge hooks attention patterns, and it keeps the numbers
            # equal to the reference Hugging Face forward.
            hf_model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager"
            )
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MLSAEError(
                f"cannot load the weights in {path} ({first}); save the model with "
                "model.save_pretrained(path)"
            ) from None
        return _boot(str(path), hf_model, tokenizer, device, dtype, sae_transformer)


def official_name(name: str) -> str:
    """The hub id of a TransformerLens model name (``pythia-70m-deduped`` →
    ``EleutherAI/pythia-70m-deduped``); other names are taken as hub ids as they are."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        return get_official_model_name(name)
    except (ImportError, ValueError):
        return name


def load_hub(
    name: str, device: str, dtype: torch.dtype, sae_transformer: bool = False
) -> TransformerBridge:
    """A bridge on a hub model; fails at once with one line when the hub is unreachable and
    the model is not in the local Hugging Face cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = official_name(name)
    requested = offline_requested()
    reachable = not requested and hub_reachable()
    with hub_offline_mode(not reachable):
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            hf_model = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch.float32, attn_implementation="eager"
            )
        except OSError as err:
            raise hub_failure(name, err, requested, reachable) from err
        except ValueError as err:  # transformers: a config it cannot map to a causal LM
            raise MLSAEError(
                f"{name!r} is not a causal language model transformers can load "
                f"({str(err).splitlines()[0]}); mlsae-lens reads decoder-only causal LMs "
                f"({_examples()})"
            ) from None
        architecture = type(hf_model).__name__
        if architecture not in supported_architectures():
            raise MLSAEError(
                f"{name!r} is a {architecture}, which TransformerLens' TransformerBridge does "
                f"not support; supported causal LMs: {', '.join(supported_architectures())}"
            )
        return _boot(name, hf_model, tokenizer, device, dtype, sae_transformer)


# ---------------------------------------------------------------------------------------------
# The embedded model as a plain Hugging Face directory
# ---------------------------------------------------------------------------------------------


def embedded_cache_dir() -> Path:
    """Cache folder of the dequantized embedded model (a ``save_pretrained`` directory)."""
    return sources.embedded_cache_dir("-hf", BRIDGE_CACHE_FORMAT_VERSION, "transformers")


def cache_is_intact(cache_dir: Path) -> bool:
    """Every file listed in the cache's checksum file exists and matches its SHA-256."""
    try:
        sources.verify_checksums(cache_dir)
    except ValueError as err:
        logger.debug("cache %s is not intact: %s", cache_dir, err)
        return False
    return True


def _write_embedded_dir(cache_dir: Path) -> None:
    """Dequantize the GGUF once and save it (weights, config, tokenizer, checksums) atomically.

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf"), so the weights
    are moved into a fresh model built from the same config without its quantization entry.
    """
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = sources.load_embedded_hf_model(torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with sources.checked_cache_writer(cache_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("cached the dequantized %s in %s", EMBEDDED_MODEL_NAME, cache_dir)


def load_embedded(
    device: str, dtype: torch.dtype, sae_transformer: bool = False
) -> TransformerBridge:
    """The embedded SmolLM2 through the bridge, from its cached Hugging Face directory.

    The cache is rebuilt only when it is proven bad (missing or unreadable file, checksum
    mismatch), never because of an argument such as ``device``.
    """
    cache_dir = embedded_cache_dir()
    if cache_dir.exists() and not cache_is_intact(cache_dir):
        logger.warning("model cache %s is bad; rebuilding it", cache_dir)
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not cache_dir.exists():
        _write_embedded_dir(cache_dir)
    model = load_local(cache_dir, device, dtype, sae_transformer)
    model.cfg.model_name = EMBEDDED_MODEL_NAME
    # SmolLM2 was trained without a BOS token; its chat template starts with <|im_start|>.
    model.cfg.default_prepend_bos = False
    return model
