"""All-layer residual activations: harvest, mask, shuffle.

One forward pass per batch of contexts caches ``blocks.{l}.hook_resid_post`` for every
layer and stops before the unembedding. Every (token, layer) vector is an SAE example; a
token's layers travel together as one ``[n_layers, d_in]`` row so the loss can be taken
per layer. Special-token positions (BOS/EOS/pad) are dropped, not zeroed.

The stream is deterministic given ``(seed, chunk index)``, which is what makes
``--resume`` end bitwise equal to an uninterrupted run: a resumed run re-harvests the
chunk it stopped in and skips the batches it already used.
"""

from collections.abc import Iterator
from dataclasses import dataclass
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


def check_finite(acts: Tensor, where: str) -> None:
    if not torch.isfinite(acts).all():
        raise MLSAEError(
            f"non-finite (NaN/inf) activations in {where}; the model produced NaN/inf — "
            "check the model's dtype (use float32) and its weights"
        )


def valid_token_vectors(acts: Tensor, special_mask: Tensor) -> Tensor:
    """Drop special-token positions: ``[batch, pos, L, d]`` → ``[n_valid, L, d]``."""
    return acts[~special_mask.to(acts.device)]


@dataclass
class ActivationStreamConfig:
    contexts_per_chunk: int = 32
    """Contexts harvested per forward chunk; their tokens are shuffled together."""
    batch_size_tokens: int = 128
    """Tokens per SAE batch (each brings n_layers vectors)."""
    model_batch_size: int = 8
    """Contexts per model forward pass."""
    seed: int = 0


class ActivationStream:
    """Shuffled batches ``[batch_size_tokens, n_layers, d_model]`` from a token tensor.

    Contexts are visited in a seeded permutation, ``contexts_per_chunk`` at a time; the
    valid tokens of a chunk are shuffled with a generator seeded by (seed, chunk) and cut
    into batches (the ragged remainder of a chunk is dropped). Position = (chunk, batch).
    """

    def __init__(
        self,
        model: Any,
        tokens: Tensor,
        special_mask: Tensor,
        cfg: ActivationStreamConfig,
        device: str = "cpu",
    ):
        if tokens.shape[0] == 0:
            raise MLSAEError("the training split has no contexts; use a larger corpus")
        self.model = model
        self.tokens = tokens
        self.special_mask = special_mask
        self.cfg = cfg
        self.device = device
        order_gen = torch.Generator().manual_seed(cfg.seed)
        self.context_order = torch.randperm(tokens.shape[0], generator=order_gen)

    @property
    def n_chunks(self) -> int:
        return -(-self.tokens.shape[0] // self.cfg.contexts_per_chunk)

    def harvest_chunk(self, chunk: int) -> Tensor:
        """Valid-token vectors of one chunk, shuffled deterministically."""
        chunk = chunk % self.n_chunks  # epochs wrap around
        start = chunk * self.cfg.contexts_per_chunk
        ids = self.context_order[start : start + self.cfg.contexts_per_chunk]
        mbs = self.cfg.model_batch_size
        parts = [self.harvest_group(g, ids[i : i + mbs], chunk) for g, i in enumerate(range(0, len(ids), mbs))]
        vectors = torch.cat(parts)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + chunk)
        return vectors[torch.randperm(vectors.shape[0], generator=gen).to(vectors.device)]

    def harvest_group(self, group: int, contexts: Tensor, chunk: int) -> Tensor:  # noqa: ARG002
        """Valid-token vectors of one model forward pass (the unit a distributed stream
        deals out to ranks)."""
        acts = harvest_resid_post(self.model, self.tokens[contexts])
        check_finite(acts, f"chunk {chunk}")
        return valid_token_vectors(acts, self.special_mask[contexts]).to(self.device)

    def batches(self, start_chunk: int = 0, start_batch: int = 0) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(chunk, batch_in_chunk, batch)`` forever, from a saved position on."""
        chunk = start_chunk
        skip = start_batch
        bs = self.cfg.batch_size_tokens
        empty_chunks = 0
        while True:
            vectors = self.harvest_chunk(chunk)
            n_batches = vectors.shape[0] // bs
            empty_chunks = empty_chunks + 1 if n_batches == 0 else 0
            if empty_chunks >= self.n_chunks:
                raise MLSAEError(
                    f"no chunk holds a full batch of {bs} tokens; lower --batch-size-tokens "
                    "or raise --contexts-per-chunk"
                )
            for b in range(skip, n_batches):
                yield chunk, b, vectors[b * bs : (b + 1) * bs]
            skip = 0
            chunk += 1


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
