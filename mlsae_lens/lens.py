"""Tuned-lens translators for MLSAEs (paper §4.4): load, train, evaluate, map to layers.

A tuned lens (Belrose et al. 2023, the ``tuned-lens`` package) holds one affine translator
``h ↦ h + W_i h + b_i`` per layer that maps hidden state ``i`` into the basis the final layer's
unembedding reads. A tuned-lens MLSAE applies them before its encoder (see :mod:`mlsae_lens.sae`).

Index convention (the reference implementation was one block off here). tuned-lens trains
translator ``i`` on HF ``hidden_states[i]``, the *input* of block ``i``, which is TransformerLens'
``blocks.{i}.hook_resid_pre``. The MLSAE reads ``blocks.{l}.hook_resid_post``, the input of block
``l + 1``. So:

=====================================  ==================================
MLSAE layer ``l`` (``hook_resid_post``)  tuned-lens translator
=====================================  ==================================
``0 .. n_layers - 2``                   ``l + 1``
``n_layers - 1`` (the last block)       none: identity (it *is* the final basis)
=====================================  ==================================

Translator 0 (the embeddings) is trained and saved but no MLSAE layer uses it.

tuned-lens works with Hugging Face models; for a TransformerLens model the adapter is one line:
``tuned_lens.nn.Unembed`` already reads a ``HookedTransformer``'s ``ln_final`` and ``W_U``, so
``TunedLens(Unembed(model), TunedLensConfig(...))`` is a lens for it (:func:`lens_for_model`).
Lenses are saved in tuned-lens' own format (``lens.save``: ``params.pt`` + ``config.json``), so
``TunedLens.from_model_and_pretrained(hf_model, DIR)`` reads ours; we read ``params.pt`` only
with ``torch.load(..., weights_only=True)``.
"""

import logging
import math
import os
import pickle
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tuned_lens import TunedLens
from tuned_lens.nn import Unembed
from tuned_lens.nn.lenses import TunedLensConfig

from mlsae_lens.activations import harvest_hooks, resid_post_hook_names
from mlsae_lens.atomic import atomic_write_json, staging_dir
from mlsae_lens.errors import MLSAEError
from mlsae_lens.memory import resolve_model_batch_size
from mlsae_lens.models import LanguageModel
from mlsae_lens.progress import progress_bar

logger = logging.getLogger(__name__)

LENS_PARAMS = "params.pt"
LENS_CONFIG = "config.json"
LENS_EVAL = "lens_eval.json"
PRETRAINED = "pretrained"
"""``--tuned-lens pretrained``: tuned-lens' pretrained lens for the model's Hugging Face name."""


# ---------------------------------------------------------------------------------------------
# The adapter and the index mapping
# ---------------------------------------------------------------------------------------------


def lens_for_model(model: LanguageModel) -> TunedLens:
    """An identity tuned lens (all translators zero) for a TransformerLens model."""
    config = TunedLensConfig(
        base_model_name_or_path=model.cfg.model_name,
        d_model=model.cfg.d_model,
        num_hidden_layers=model.cfg.n_layers,
    )
    return TunedLens(unembed_for(model), config).to(model.cfg.device)


def unembed_for(model: Any) -> Unembed:
    """tuned-lens' ``Unembed`` (final norm + unembedding) of a TransformerLens model.

    tuned-lens reads a ``HookedTransformer``'s ``ln_final``/``W_U`` itself. A TransformerBridge
    has replaced the Hugging Face ``norm``/``lm_head`` by hooked wrappers, which tuned-lens'
    model surgery does not recognise, so its ``Unembed`` gets copies of the wrapped Hugging Face
    modules (the same objects tuned-lens would read from the unwrapped model).
    """
    import copy

    from mlsae_lens.bridge import is_bridge

    if not is_bridge(model):
        return Unembed(model)
    unembed = Unembed.__new__(Unembed)
    torch.nn.Module.__init__(unembed)
    unembed.final_norm = copy.deepcopy(model.ln_final.original_component)
    unembed.unembedding = copy.deepcopy(model.unembed.original_component)
    unembed.requires_grad_(False)
    return unembed


def resid_post_translators(lens: TunedLens) -> tuple[Tensor, Tensor]:
    """Per-MLSAE-layer translators ``(weight [n_layers, d, d], bias [n_layers, d])``.

    Layer ``l``'s ``hook_resid_post`` gets translator ``l + 1``; the last layer gets zeros (the
    identity). Weights are ``nn.Linear`` weights: ``y = x + weight[l] @ x + bias[l]``.
    """
    translators = list(lens.layer_translators)
    n_layers = len(translators)
    d = lens.config.d_model
    ref = translators[0].weight
    weight = ref.new_zeros(n_layers, d, d)
    bias = ref.new_zeros(n_layers, d)
    for layer in range(n_layers - 1):
        translator = translators[layer + 1]
        weight[layer] = translator.weight.detach()
        if translator.bias is not None:
            bias[layer] = translator.bias.detach()
    return weight.float(), bias.float()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).exists()


def _check_config(config: dict[str, Any], model: LanguageModel, where: str) -> None:
    d_model, n_layers = config.get("d_model"), config.get("num_hidden_layers")
    if d_model != model.cfg.d_model or n_layers != model.cfg.n_layers:
        raise MLSAEError(
            f"the tuned lens in {where} was made for d_model={d_model}, {n_layers} layers, but "
            f"{model.cfg.model_name} has d_model={model.cfg.d_model}, {model.cfg.n_layers} layers; "
            "use a lens trained for this model (mlsae-lens train-lens MODEL)"
        )


def _from_resource(model: LanguageModel, resource_id: str, where: str) -> TunedLens:
    """tuned-lens' own loader, with ``weights_only=True`` and one clear error per failure."""
    try:
        lens = TunedLens.from_unembed_and_pretrained(
            unembed_for(model), resource_id, weights_only=True, map_location="cpu"
        )
    except pickle.UnpicklingError as err:
        raise MLSAEError(
            f"{where}/{LENS_PARAMS} is not a plain tensor state dict, so it was refused "
            f"(torch.load(weights_only=True): {str(err).splitlines()[0]}); it may run code when "
            "unpickled: load only lenses written by TunedLens.save, or train one with "
            "mlsae-lens train-lens"
        ) from None
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shapes
        raise MLSAEError(
            f"the tuned lens in {where} does not fit {model.cfg.model_name} "
            f"({str(err).splitlines()[0]}); use a lens trained for this model"
        ) from None
    return lens.to(model.cfg.device)


def load_lens_dir(path: str | Path, model: LanguageModel) -> TunedLens:
    """A lens saved by ``TunedLens.save`` (``params.pt`` + ``config.json``) in ``path``.

    Raises:
        MLSAEError: missing files, a lens for another model, or a ``params.pt`` that is not a
            plain state dict (``weights_only=True`` refuses arbitrary pickles).
    """
    import json

    path = Path(path).expanduser()
    if not path.is_dir():
        raise MLSAEError(
            f"no tuned-lens directory at {path}; train one with `mlsae-lens train-lens MODEL "
            f"--output {path}` or pass an existing lens directory to --tuned-lens"
        )
    missing = [name for name in (LENS_PARAMS, LENS_CONFIG) if not (path / name).is_file()]
    if missing:
        raise MLSAEError(
            f"{path} is not a tuned-lens directory (missing {', '.join(missing)}); it needs the "
            "params.pt and config.json that TunedLens.save writes"
        )
    try:
        config = json.loads((path / LENS_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MLSAEError(f"{path / LENS_CONFIG} is not valid JSON ({err}); re-save the lens") from None
    _check_config(config, model, str(path))
    return _from_resource(model, str(path), str(path))


def load_pretrained_lens(model: LanguageModel, resource_id: str | None = None) -> TunedLens:
    """tuned-lens' pretrained lens (``TunedLens.from_*_and_pretrained`` resource ids, e.g.
    ``EleutherAI/pythia-160m-deduped``); needs the Hugging Face hub.

    ``resource_id=None`` uses the model's Hugging Face name. The lens' unembedding is built from
    the TransformerLens model itself (tuned-lens' ``Unembed`` reads it), so no second copy of the
    model is downloaded; the translators only act on hidden states, which equal HF's.
    """
    from mlsae_lens.models import hub_unavailable

    if resource_id is None:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        try:
            resource_id = get_official_model_name(model.cfg.model_name)
        except ValueError:
            resource_id = model.cfg.model_name
    if hub_unavailable():
        raise MLSAEError(
            f"cannot fetch the pretrained tuned lens {resource_id!r}: the Hugging Face hub cannot be "
            "reached (and it is not a local lens directory); train one offline with "
            "`mlsae-lens train-lens MODEL --output DIR` and pass --tuned-lens DIR"
        )
    try:
        return _from_resource(model, resource_id, f"pretrained lens {resource_id!r}")
    except MLSAEError:
        raise
    except Exception as err:  # noqa: BLE001 - hub errors (not found, HTTP) have many types
        raise MLSAEError(
            f"cannot fetch the pretrained tuned lens {resource_id!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); tuned-lens publishes lenses for a few "
            "models only: train one with `mlsae-lens train-lens MODEL --output DIR`"
        ) from None


def load_lens(source: str, model: LanguageModel) -> TunedLens:
    """Resolve ``--tuned-lens SOURCE``: a lens directory, ``pretrained`` (the model's own
    pretrained lens) or a tuned-lens resource id (fetched from the hub).

    Raises:
        MLSAEError: with the fix, for every way the source cannot be used.
    """
    if _looks_like_path(source):
        return load_lens_dir(source, model)
    return load_pretrained_lens(model, None if source == PRETRAINED else source)


def save_lens(lens: TunedLens, directory: str | Path) -> Path:
    """``lens.save`` (tuned-lens' format), file by file through renames."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with staging_dir(directory, ".tmp-lens-") as tmp:
        lens.save(tmp, ckpt=LENS_PARAMS, config=LENS_CONFIG)
        for name in (LENS_PARAMS, LENS_CONFIG):  # params first: a config always has its params
            os.replace(tmp / name, directory / name)
    return directory


# ---------------------------------------------------------------------------------------------
# Pure math: hidden states and the KL objective
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def harvest_hidden_states(model: LanguageModel, tokens: Tensor) -> Tensor:
    """HF-style hidden states ``[batch, pos, n_layers + 1, d]``: index ``i < n_layers`` is the
    input of block ``i`` (``blocks.{i}.hook_resid_pre``), index ``n_layers`` the last block's
    output (``blocks.{n_layers-1}.hook_resid_post``, before the final norm)."""
    n = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre", *resid_post_hook_names(n)]
    return harvest_hooks(model, tokens, names)


def layer_kl(lens: TunedLens, hidden: Tensor, index: int, target_logprobs: Tensor, tuned: bool = True) -> Tensor:
    """Mean over vectors of KL(final ‖ lens) for hidden state ``index`` (upstream's objective).

    Args:
        hidden: ``[N, n_layers + 1, d]`` hidden states.
        target_logprobs: ``[N, vocab]`` log-probabilities of the final logits.
        tuned: the tuned lens (else the logit lens: unembed the hidden state as is).
    """
    h = hidden[:, index]
    logits = lens(h, idx=index) if tuned else lens.unembed(h)
    return (target_logprobs.exp() * (target_logprobs - logits.float().log_softmax(-1))).sum(-1).mean()


def final_logprobs(lens: TunedLens, hidden: Tensor) -> Tensor:
    with torch.no_grad():
        return lens.unembed(hidden[:, -1]).float().log_softmax(-1)


# ---------------------------------------------------------------------------------------------
# Training (our loop, tuned-lens' objective and optimizer defaults)
# ---------------------------------------------------------------------------------------------


@dataclass
class LensTrainingConfig:
    """Training a tuned lens on CPU.

    Upstream trains 250 steps of 2^18 tokens on GPU. A CPU step costs one unembedding matmul per
    layer per token, forward and backward (SmolLM2: 30 x 576 x 49152), so each step instead
    samples ``tokens_per_step`` positions from a pool of ``pool_tokens`` train-split tokens whose
    hidden states are harvested once (the model's forward pass would cost more than the step).
    """

    steps: int = 40
    tokens_per_step: int = 32
    pool_tokens: int = 2048
    eval_tokens: int = 256
    lr_scale: float = 1.0
    """SGD lr = lr_scale * (1 - momentum), as upstream (PyTorch's momentum scales by 1/(1-β))."""
    momentum: float = 0.9
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    model_batch_size: int | None = None
    """Contexts per forward of the harvest; ``None``: sized from the free memory."""
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("steps", "tokens_per_step", "pool_tokens", "eval_tokens", "model_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise MLSAEError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise MLSAEError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.lr_scale <= 0:
            raise MLSAEError(f"--lr-scale must be positive, got {self.lr_scale}")


def hidden_state_pool(
    model: LanguageModel,
    contexts: Tensor,
    special_mask: Tensor,
    max_tokens: int,
    batch_size: int,
    desc: str = "harvest",
) -> Tensor:
    """``[N ≤ max_tokens, n_layers + 1, d]`` hidden states of the non-special tokens of the
    first contexts (enough of them for ``max_tokens``)."""
    pool: list[Tensor] = []
    count = 0
    with progress_bar(total=max_tokens, desc=desc, unit="tok") as bar:
        for start in range(0, contexts.shape[0], batch_size):
            ctx = contexts[start : start + batch_size]
            hidden = harvest_hidden_states(model, ctx)[~special_mask[start : start + batch_size].to(model.cfg.device)]
            hidden = hidden[: max_tokens - count].cpu()
            pool.append(hidden)
            count += hidden.shape[0]
            bar.update(hidden.shape[0])
            if count >= max_tokens:
                break
    if count == 0:
        raise MLSAEError("the corpus split holds no valid tokens to train or evaluate a lens on")
    return torch.cat(pool)


def train_lens(lens: TunedLens, pool: Tensor, cfg: LensTrainingConfig) -> list[dict[str, float]]:
    """Train ``lens`` in place: SGD (Nesterov), linear decay to zero, grad-norm clipping.

    Each step's loss is the sum over translators of KL(final ‖ lens) on ``tokens_per_step``
    positions drawn from ``pool``; each layer backpropagates separately (as upstream) so only one
    ``[tokens, vocab]`` logit tensor is alive at a time.

    Returns:
        One record per step: step, lr, mean KL over translators.
    """
    params = [p for p in lens.layer_translators.parameters()]
    opt = torch.optim.SGD(
        params, lr=cfg.lr_scale * (1 - cfg.momentum), momentum=cfg.momentum, nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    device = params[0].device
    n_translators = len(lens.layer_translators)
    log: list[dict[str, float]] = []
    with progress_bar(range(cfg.steps), desc="train-lens", unit="step") as bar:
        for step in bar:
            rows = torch.randint(pool.shape[0], (cfg.tokens_per_step,), generator=gen)
            hidden = pool[rows].to(device)
            target = final_logprobs(lens, hidden)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for index in range(n_translators):
                loss = layer_kl(lens, hidden, index, target)
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            record = {"step": step + 1, "lr": opt.param_groups[0]["lr"], "kl": total / n_translators}
            log.append(record)
            bar.set_postfix(kl=f"{record['kl']:.3f}")
    return log


@torch.no_grad()
def evaluate_lens(lens: TunedLens, pool: Tensor, batch_tokens: int = 128) -> list[dict[str, Any]]:
    """Per hidden state: mean KL(final ‖ lens) of the tuned lens and of the logit lens.

    Rows follow tuned-lens' indexing (``hidden_state`` ``i`` = input of block ``i``), with the
    MLSAE layer whose ``hook_resid_post`` it is (``i - 1``; ``None`` for the embeddings). The
    last row is the last block's output: no translator, both lenses give the final logits.
    """
    n_translators = len(lens.layer_translators)
    sums = torch.zeros(n_translators + 1, 2, dtype=torch.float64)
    device = next(lens.parameters()).device
    for start in range(0, pool.shape[0], batch_tokens):
        hidden = pool[start : start + batch_tokens].to(device)
        target = final_logprobs(lens, hidden)
        weight = hidden.shape[0]
        for index in range(n_translators + 1):
            tuned = index < n_translators
            sums[index, 0] += weight * float(layer_kl(lens, hidden, index, target, tuned=tuned))
            sums[index, 1] += weight * float(layer_kl(lens, hidden, index, target, tuned=False))
    means = sums / pool.shape[0]
    return [
        {
            "hidden_state": index,
            "resid_post_layer": index - 1 if index > 0 else None,
            "tuned_lens_kl": float(means[index, 0]),
            "logit_lens_kl": float(means[index, 1]),
        }
        for index in range(n_translators + 1)
    ]


def format_lens_eval(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'hidden':>6} {'resid_post':>10} {'logit lens KL':>14} {'tuned lens KL':>14}"]
    for row in rows:
        layer = "embed" if row["resid_post_layer"] is None else str(row["resid_post_layer"])
        lines.append(f"{row['hidden_state']:>6} {layer:>10} {row['logit_lens_kl']:>14.4f} {row['tuned_lens_kl']:>14.4f}")
    return "\n".join(lines)


def train_lens_for_run(
    model: LanguageModel,
    splits: Any,
    output: str | Path,
    cfg: LensTrainingConfig,
    overwrite: bool = False,
) -> tuple[TunedLens, list[dict[str, Any]]]:
    """Train a lens on ``splits.train``, evaluate it against the logit lens on ``splits.test``,
    save it (``params.pt`` + ``config.json``) and the table (``lens_eval.json``) to ``output``."""
    from mlsae_lens.data import special_token_mask

    output = Path(output)
    if (output / LENS_PARAMS).exists() and not overwrite:
        raise MLSAEError(f"{output} already holds a tuned lens; pass --overwrite or choose another --output")
    batch_size = resolve_model_batch_size(
        cfg.model_batch_size, model.cfg, splits.train.shape[1], model.cfg.device
    )
    cfg = replace(cfg, model_batch_size=batch_size)  # lens_eval.json records the value used
    torch.manual_seed(cfg.seed)
    lens = lens_for_model(model)
    train_pool = hidden_state_pool(
        model, splits.train, special_token_mask(splits.train, model.tokenizer), cfg.pool_tokens,
        batch_size, desc="harvest train",
    )
    log = train_lens(lens, train_pool, cfg)
    del train_pool
    test_pool = hidden_state_pool(
        model, splits.test, special_token_mask(splits.test, model.tokenizer), cfg.eval_tokens,
        batch_size, desc="harvest test",
    )
    rows = evaluate_lens(lens, test_pool)
    save_lens(lens, output)
    atomic_write_json(
        output / LENS_EVAL,
        {
            "model": model.cfg.model_name,
            "metric": "mean KL(final logits || lens logits) in nats, test split",
            "test_tokens": int(test_pool.shape[0]),
            "training": asdict(cfg),
            "final_train_kl": log[-1]["kl"] if log else math.nan,
            "layers": rows,
            "train_log": log,
        },
    )
    return lens, rows
