"""All-layer residual activations: one forward, every ``hook_resid_post``, special tokens dropped.

One forward pass per batch of contexts writes ``blocks.{l}.hook_resid_post`` of every layer
into one tensor and stops before the unembedding. Every (token, layer) vector is an SAE
example; a token's layers travel together as one ``[n_layers, d_in]`` row so the loss can be
taken per layer. Special-token positions (BOS/EOS/pad) are dropped, not zeroed. The seeded
orders here (:func:`context_order`, :func:`chunk_shuffle`) make the training stream
deterministic given ``(seed, chunk)``, which is what lets ``--resume`` end bitwise equal to an
uninterrupted run; training reads them through
:class:`mlsae_lens.activations_store.MultiLayerActivationsStore`.
"""

from typing import Any

import torch
from torch import Tensor

from mlsae_lens.errors import MLSAEError
from mlsae_lens.progress import progress_bar


def resid_post_hook_names(n_layers: int) -> list[str]:
    return [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the last harvest hook so the bridge never runs the final norm and unembed."""


@torch.inference_mode()
def harvest_hooks(model: Any, tokens: Tensor, names: list[str]) -> Tensor:
    """The named hooks' activations ``[batch, pos, len(names), d_model]`` (float32), from a
    forward that stops right after the last block.

    Each hook writes straight into one preallocated output (no activation cache, no stack
    copy). ``HookedTransformer`` stops with ``stop_at_layer=n_layers``; TransformerBridge's
    ``stop_at_layer`` still runs the final norm and unembedding, so there the last block's
    hook ends the forward itself (every name must lie inside the blocks).
    """
    from mlsae_lens.bridge import is_bridge

    n_layers, device = model.cfg.n_layers, model.cfg.device
    tokens = tokens.to(device)
    out = torch.empty(*tokens.shape, len(names), model.cfg.d_model, dtype=torch.float32, device=device)
    bridge = is_bridge(model)
    last = f"blocks.{n_layers - 1}.hook_resid_post"

    def writer(index: int, stop: bool):
        def hook(act: Tensor, hook: Any) -> None:
            out[:, :, index] = act
            if stop:
                raise _StopForward

        return hook

    hooks = [(name, writer(i, bridge and name == last)) for i, name in enumerate(names)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        try:
            model(tokens, **({} if bridge else {"stop_at_layer": n_layers}))
        except _StopForward:
            return out
    if bridge:  # the last hook never ran: the model silently ignored the hook names
        raise MLSAEError(
            f"{type(model).__name__} did not run the hook {last}; load the model with "
            "mlsae_lens.models.load_model so that its TransformerLens hook names resolve"
        )
    return out


def harvest_resid_post(model: Any, tokens: Tensor) -> Tensor:
    """Residual stream after every block: ``[batch, pos, n_layers, d_model]`` (float32).

    Equal to the Hugging Face ``hidden_states[l + 1]`` for every layer but the last, where
    Hugging Face applies the final norm and this is the block output before it. The forward
    stops after the last block, so the final norm and unembedding never run.
    """
    return harvest_hooks(model, tokens, resid_post_hook_names(model.cfg.n_layers))


def context_order(n_rows: int, seed: int) -> Tensor:
    """The seeded permutation in which a map-style dataset's rows (contexts) are read in training."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))


def chunk_shuffle(n_vectors: int, seed: int, chunk: int) -> Tensor:
    """The permutation of chunk ``chunk``'s vectors: depends on nothing but (seed, chunk)."""
    return torch.randperm(n_vectors, generator=torch.Generator().manual_seed(seed * 1_000_003 + chunk))


def check_finite(acts: Tensor, where: str) -> None:
    if not torch.isfinite(acts).all():
        raise MLSAEError(
            f"non-finite (NaN/inf) activations in {where}; the model produced NaN/inf — "
            "check the model's dtype (use float32) and its weights"
        )


def valid_token_vectors(acts: Tensor, special_mask: Tensor) -> Tensor:
    """Drop special-token positions: ``[batch, pos, L, d]`` → ``[n_valid, L, d]``."""
    return acts[~special_mask.to(acts.device)]


@torch.inference_mode()
def estimate_layer_means(
    model: Any,
    tokens: Tensor,
    special_mask: Tensor,
    n_tokens: int,
    model_batch_size: int = 8,
) -> Tensor:
    """Per-layer dataset mean ``[n_layers, d_model]`` over the first ``n_tokens`` valid
    tokens of ``tokens`` (float64 accumulation): the ``center`` normalization's shift."""
    total = None
    count = 0
    with progress_bar(total=n_tokens, desc="layer means", unit="tok", leave=False) as bar:
        for i in range(0, tokens.shape[0], model_batch_size):
            acts = harvest_resid_post(model, tokens[i : i + model_batch_size])
            check_finite(acts, "layer-mean estimation")
            vectors = valid_token_vectors(acts, special_mask[i : i + model_batch_size])
            vectors = vectors[: n_tokens - count].double()
            total = vectors.sum(0) if total is None else total + vectors.sum(0)
            count += vectors.shape[0]
            bar.update(vectors.shape[0])
            if count >= n_tokens:
                break
    if total is None or count == 0:
        raise MLSAEError("no valid tokens to estimate the layer means from; use a larger corpus")
    return (total / count).float()
