"""Published reference checkpoints (tim-lawson/mlsae) → an MLSAE ``cfg.json`` dict and state dict.

The paper's authors published their MLSAEs as ``tim-lawson/mlsae-<model>-x<R>-k<k>[-lens][-tfm]``
with their own layout (facts in ``shared/notes/reference-implementation.md``):

* ``config.json``: ``n_inputs``, ``n_latents``, ``k``, ``standardize`` (and AuxK fields);
* ``model.safetensors``: ``encoder.weight`` [n_latents, n_inputs] (no encoder bias),
  ``decoder.weight`` [n_inputs, n_latents], ``pre_encoder_bias`` [n_inputs].

``-tfm`` repositories hold the whole training module instead: the SAE keys prefixed with
``autoencoder.``, the transformer, and for ``-lens`` SAEs the tuned lens as
``lens.layer_translators.{i}.weight`` / ``.bias``; their ``config.json`` holds the training
arguments (``expansion_factor``, ``k``, ``standardize``, ``tuned_lens``, ...), so the sizes are
read from the tensors. Only the SAE and lens tensors are read from such a file.

Their math — standardize per vector, subtract ``pre_encoder_bias``, encode, top-k, ReLU,
decode, add the bias back, de-standardize — is exactly a :class:`~mlsae_lens.sae.MultiLayerSAE` with
``W_enc = encoder.weight.T``, ``b_enc = 0``, ``W_dec = decoder.weight.T``,
``b_dec = pre_encoder_bias`` and ``normalization = "standardize"`` (or ``none``) with
``standardize_convention = "reference"``: divide by ``std + eps``, multiply back by ``std``.

``-lens`` SAEs read ``translator_l(x_l) = x_l + W_l x_l + b_l`` of every layer, and standardize
*after* the lens, which is the order of :meth:`~mlsae_lens.sae_mixin.MultiLayerMixin.normalize_input` (lens, then
normalization). The translators become the SAE's ``lens_weight`` / ``lens_bias`` buffers with the
**reference mapping: tuned-lens translator l on** ``blocks.{l}.hook_resid_post``. That matches
how these checkpoints were trained, which is one block off tuned-lens' own convention (translator
l is trained on the *input* of block l; mlsae-lens' own training uses translator l + 1, see
:mod:`mlsae_lens.lens`). Plain ``-lens`` repositories do not contain the lens: it is tuned-lens'
pretrained lens for the model (resource id ``EleutherAI/<model>``, the one the reference loaded),
fetched from the hub, or a lens passed explicitly. Reconstructions in the lens basis equal the
reference's; in the model basis mlsae-lens applies the exact inverse translator (the reference
used only the diagonal of ``(I + W_l)^-1``).

The converters are pure (tensors in, dicts out) apart from reading the files and fetching
tuned-lens' pretrained lens; :func:`reference_disk_loader` is a SAELens ``PretrainedSaeDiskLoader``
(``SAE.load_from_disk(..., converter=...)``). The release registry and download are
:mod:`mlsae_lens.releases`; run directories and model cards, :mod:`mlsae_lens.pretrained`.
"""

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mlsae_lens.checkpoint import check_not_pickle, refuse_pickles_instead_of_weights
from mlsae_lens.errors import MLSAEError
from mlsae_lens.models import hub_unavailable
from mlsae_lens.sae_files import ARCHITECTURE, check_finite_floats

REFERENCE_KEYS = ("encoder.weight", "decoder.weight", "pre_encoder_bias")
TFM_PREFIX = "autoencoder."
LENS_PREFIX = "lens.layer_translators."
REFERENCE_LENS_CONVENTION = (
    "reference: tuned-lens translator l on blocks.{l}.hook_resid_post (how the checkpoint was "
    "trained; one block off tuned-lens' own convention, translator l on the input of block l)"
)
TUNED_LENS_HUB = "https://huggingface.co/spaces/AlignmentResearch/tuned-lens/tree/main/lens"
_TRANSLATOR_KEY = re.compile(r"^(?:lens\.)?(?:layer_translators\.)?(\d+)\.(weight|bias)$")


# ---------------------------------------------------------------------------------------------
# Pure conversion: reference tensors -> our cfg.json dict and state dict
# ---------------------------------------------------------------------------------------------


def lens_buffers(
    translators: dict[str, torch.Tensor], n_layers: int, d_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack translators into ``lens_weight`` [n_layers, d, d] and ``lens_bias`` [n_layers, d].

    Reference mapping: translator ``l`` goes to MLSAE layer ``l`` (``blocks.{l}.hook_resid_post``),
    because that is how the published ``-lens`` checkpoints were trained (one block off
    tuned-lens' own convention; see the module docstring).

    Args:
        translators: ``{i}.weight`` / ``{i}.bias`` tensors, optionally prefixed with ``lens.`` and
            ``layer_translators.`` (tuned-lens' ``params.pt``, a ``-tfm`` checkpoint).
    """
    weights: dict[int, torch.Tensor] = {}
    biases: dict[int, torch.Tensor] = {}
    for key, value in translators.items():
        match = _TRANSLATOR_KEY.match(key)
        if match is None:
            continue
        (weights if match.group(2) == "weight" else biases)[int(match.group(1))] = value.float()
    if sorted(weights) != list(range(n_layers)):
        raise MLSAEError(
            f"the tuned lens has translators {sorted(weights)}, but this MLSAE reads {n_layers} layers "
            f"and needs translators 0..{n_layers - 1}; is the lens for this model?"
        )
    weight = torch.zeros(n_layers, d_in, d_in)
    bias = torch.zeros(n_layers, d_in)
    for layer in range(n_layers):
        if tuple(weights[layer].shape) != (d_in, d_in):
            raise MLSAEError(
                f"tuned-lens translator {layer} has shape {list(weights[layer].shape)}, but the SAE "
                f"reads d_in={d_in}; is the lens for this model?"
            )
        weight[layer] = weights[layer]
        if layer in biases:
            bias[layer] = biases[layer].reshape(d_in)
    return weight, bias


def checkpoint_lens(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``lens.layer_translators.*`` tensors a ``-tfm`` checkpoint holds (empty if none)."""
    return {k: v for k, v in tensors.items() if k.startswith(LENS_PREFIX)}


def reference_state_to_mlsae(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    n_layers: int,
    model_name: str | None = None,
    lens: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a reference checkpoint to our ``cfg.json`` dict and state dict.

    Args:
        config: the checkpoint's ``config.json`` (plain SAE or ``-tfm`` training arguments).
        tensors: its tensors; ``autoencoder.`` prefixes are stripped, and
            ``lens.layer_translators.*`` tensors make a tuned-lens MLSAE.
        lens: tuned-lens translators to use instead (e.g. tuned-lens' pretrained lens for a plain
            ``-lens`` repository), mapped with :func:`lens_buffers`.
    """
    tensors = {k.removeprefix(TFM_PREFIX): v for k, v in tensors.items()}
    missing = [key for key in REFERENCE_KEYS if key not in tensors]
    if missing:
        raise MLSAEError(
            f"not a reference MLSAE checkpoint: model.safetensors lacks {', '.join(missing)}; "
            "expected encoder.weight, decoder.weight and pre_encoder_bias"
        )
    encoder, decoder = tensors["encoder.weight"].float(), tensors["decoder.weight"].float()
    try:
        k = int(config["k"])
        # -tfm configs hold the training arguments, not the sizes: read those from the tensors.
        d_in = int(config.get("n_inputs", encoder.shape[-1]))
        d_sae = int(config.get("n_latents", encoder.shape[0]))
    except KeyError as exc:
        raise MLSAEError(
            f"reference config.json lacks {exc.args[0]!r}; it needs k (the latents kept per vector)"
        ) from None
    if encoder.shape != (d_sae, d_in) or decoder.shape != (d_in, d_sae):
        raise MLSAEError(
            f"reference checkpoint shapes do not match its config: encoder {list(encoder.shape)}, "
            f"decoder {list(decoder.shape)}, expected [{d_sae}, {d_in}] and [{d_in}, {d_sae}]"
        )
    if lens is None:
        lens = checkpoint_lens(tensors) or None
    if lens is None and config.get("tuned_lens"):
        raise MLSAEError(
            "this checkpoint was trained with a tuned lens but holds none; pass the lens it was "
            "trained with (tuned-lens' pretrained lens for the model, a params.pt directory)"
        )
    cfg = {
        "architecture": ARCHITECTURE,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "n_layers": n_layers,
        "normalization": "standardize" if config.get("standardize", True) else "none",
        # The reference multiplies back by std (not std + eps): the reference convention.
        "standardize_convention": "reference",
        "tuned_lens": lens is not None,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "metadata": {
            "model_name": model_name,
            "hook_names": [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)],
            "converted_from": "tim-lawson/mlsae reference format",
            **({"lens_convention": REFERENCE_LENS_CONVENTION} if lens is not None else {}),
        },
    }
    state = {
        "W_enc": encoder.T.contiguous(),
        "b_enc": torch.zeros(d_sae),
        "W_dec": decoder.T.contiguous(),
        "b_dec": tensors["pre_encoder_bias"].float().clone(),
        "layer_means": torch.zeros(n_layers, d_in),
    }
    if lens is not None:
        state["lens_weight"], state["lens_bias"] = lens_buffers(lens, n_layers, d_in)
    return cfg, state


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def _wanted(key: str) -> bool:
    return key.removeprefix(TFM_PREFIX) in REFERENCE_KEYS or key.startswith(LENS_PREFIX)


def read_reference_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` + the SAE (and lens) tensors of ``model.safetensors`` of a downloaded
    reference checkpoint; a ``-tfm`` file's transformer weights are never read."""
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not weights_file.exists():
        refuse_pickles_instead_of_weights(path)  # e.g. a pytorch_model.bin
    check_not_pickle(weights_file)
    for file in (config_file, weights_file):
        if not file.is_file():
            raise MLSAEError(f"{path} is not a reference MLSAE checkpoint: {file.name} is missing")
    try:
        config = json.loads(config_file.read_text())
        with safe_open(weights_file, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys() if _wanted(key)}
    except Exception as exc:  # JSON or safetensors errors
        raise MLSAEError(
            f"could not read the checkpoint in {path} ({type(exc).__name__}: {exc}); re-download it"
        ) from exc
    check_finite_floats(tensors, str(weights_file), "the checkpoint is damaged; re-download it")
    return config, tensors


def read_lens(source: str | Path) -> dict[str, torch.Tensor]:
    """Tuned-lens translators from disk: a tuned-lens directory (``params.pt`` + ``config.json``,
    as ``TunedLens.save`` writes), a ``.safetensors`` file, or a ``-tfm`` checkpoint directory.

    ``params.pt`` is read with ``torch.load(weights_only=True)`` (plain tensors only).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            lens = checkpoint_lens(read_reference_dir(path)[1])
            if not lens:
                raise MLSAEError(
                    f"{path}/model.safetensors holds no {LENS_PREFIX}* tensors; pass a tuned-lens "
                    "directory (params.pt + config.json)"
                )
            return lens
        path = path / "params.pt"
    if not path.is_file():
        raise MLSAEError(
            f"no tuned lens at {source}: pass a tuned-lens directory (params.pt + config.json), a "
            ".safetensors file of layer translators, or a -tfm checkpoint directory"
        )
    if path.suffix == ".safetensors":
        check_not_pickle(path)  # a renamed pickle gets the pickle message, not "corrupted"
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (not plain tensors), damaged files
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise MLSAEError(
            f"could not read the tuned lens {path} ({type(exc).__name__}: {first_line}); it must "
            "hold plain tensors (TunedLens.save writes such a params.pt)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MLSAEError(
            f"{path} is not a tuned-lens state dict of tensors; re-save it with TunedLens.save"
        )
    return state


def fetch_pretrained_lens(resource_id: str) -> dict[str, torch.Tensor]:
    """tuned-lens' pretrained lens ``resource_id`` (e.g. ``EleutherAI/pythia-70m-deduped``) from
    the hub, through tuned-lens' own artifact loader; one clear message when it cannot be had."""
    from tuned_lens.load_artifacts import load_lens_artifacts

    fix = (
        f"download params.pt and config.json from {TUNED_LENS_HUB}/{resource_id} and pass that "
        "directory as the lens (--lens DIR), or convert the -tfm release, which contains the lens"
    )
    if hub_unavailable():
        raise MLSAEError(
            f"cannot fetch tuned-lens' pretrained lens {resource_id!r}: the Hugging Face hub cannot "
            f"be reached; {fix}"
        )
    try:
        _, params = load_lens_artifacts(resource_id)
    except Exception as exc:  # noqa: BLE001 - hub errors have many types
        raise MLSAEError(
            f"cannot fetch tuned-lens' pretrained lens {resource_id!r} ({type(exc).__name__}); {fix}"
        ) from None
    return read_lens(params)


def convert_reference_dir(
    path: str | Path,
    n_layers: int,
    model_name: str | None = None,
    lens: str | Path | None = None,
    lens_resource_id: str | None = None,
    needs_lens: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and convert a reference checkpoint directory, finding its tuned lens if it has one.

    The lens comes from, in order: ``lens`` (a path, see :func:`read_lens`), the checkpoint's own
    ``lens.layer_translators.*`` tensors (``-tfm``), or tuned-lens' pretrained lens
    ``lens_resource_id`` (fetched) when ``needs_lens`` or the checkpoint's config says it was
    trained with one.

    Raises:
        MLSAEError: unreadable files, a lens for another model, or a lens that cannot be had.
    """
    config, tensors = read_reference_dir(Path(path))
    has_lens = needs_lens or bool(config.get("tuned_lens")) or bool(checkpoint_lens(tensors))
    translators: dict[str, torch.Tensor] | None = None
    source: str | None = None
    if lens is not None:
        if not has_lens:
            raise MLSAEError(
                f"the checkpoint in {path} was trained without a tuned lens; drop the lens, or "
                "convert a -lens release"
            )
        translators, source = read_lens(lens), str(lens)
    elif checkpoint_lens(tensors):
        source = f"{path} ({LENS_PREFIX}*)"
    elif has_lens:
        if lens_resource_id is None:
            raise MLSAEError(
                f"the checkpoint in {path} was trained with a tuned lens but holds none, and no "
                "pretrained lens is registered for it; pass the lens (--lens DIR)"
            )
        translators, source = fetch_pretrained_lens(lens_resource_id), lens_resource_id
    cfg, state = reference_state_to_mlsae(config, tensors, n_layers, model_name, translators)
    if source is not None:
        cfg["metadata"]["tuned_lens_source"] = source
    return cfg, state


def reference_disk_loader(n_layers: int, model_name: str | None = None, lens: str | Path | None = None):
    """SAELens ``PretrainedSaeDiskLoader`` for a downloaded reference checkpoint:
    ``SAE.load_from_disk(path, converter=reference_disk_loader(n_layers=6))``; ``lens`` is the
    tuned lens of a plain ``-lens`` checkpoint (a ``-tfm`` one carries its own)."""

    def loader(path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None):
        cfg, state = convert_reference_dir(
            Path(path), n_layers, model_name, lens=lens, needs_lens=lens is not None
        )
        cfg.update(cfg_overrides or {}, device=device)
        return cfg, {k: v.to(device) for k, v in state.items()}

    return loader
