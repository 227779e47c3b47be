"""Streaming top-N activating tokens of every (latent, layer) pair, and the latent explorer's math.

The explorer shows, for each MLSAE latent and layer, the test tokens where the latent fired
hardest. :class:`TopContexts` keeps them in two ``[d_sae, n_layers, N]`` tables (best values
and their token positions) and folds in each batch's sparse top-k code by sorting the batch's
``(latent, layer, value, position)`` triples into segments: memory is independent of the number
of tokens, no dense ``[tokens, layers, d_sae]`` tensor is ever built and there is no Python loop
over latents. The order is total (value descending, then earlier position first), so streaming,
resuming and merging disjoint token sets all give exactly the brute-force answer.

Also here, as pure tensor math: the decoder rows' logit lens (:func:`decoder_logit_lens`) and
latent co-appearance among the collected contexts (:func:`co_appearing_latents`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.errors import MLSAEError

EMPTY_POSITION = -1
"""Position of an unused slot (its value is 0; stored values are always > 0)."""


def _lexsort(*keys: Tensor) -> Tensor:
    """Permutation sorting by ``keys[0]``, then ``keys[1]``, ... (all ascending)."""
    order = torch.argsort(keys[-1], stable=True)
    for key in reversed(keys[:-1]):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def _segment_ranks(segments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For sorted ``segments``: the unique ids, their counts and each entry's rank within its
    segment (0 for the first entry of a segment)."""
    unique, counts = torch.unique_consecutive(segments, return_counts=True)
    starts = counts.cumsum(0) - counts
    ranks = torch.arange(segments.shape[0], device=segments.device) - starts.repeat_interleave(
        counts
    )
    return unique, counts, ranks


class TopContexts:
    """The ``top_n`` largest activations of every (latent, layer) pair over a token stream.

    ``values[j, l, i]`` is the i-th largest activation of latent ``j`` at layer ``l`` and
    ``positions[j, l, i]`` the global position of its token (into the flattened test split);
    ties go to the earlier position. Unused slots hold value 0 and position -1 (a pair active
    on fewer than ``top_n`` tokens). Tokens of different updates must be distinct.

    Args:
        n_latents: The SAE's ``d_sae``.
        n_layers: Layers the MLSAE reads.
        top_n: How many tokens to keep per (latent, layer).
        device: Where the tables live; inputs are moved there.
        with_payload: Also keep a float ``payload`` per slot, carried along with its entry
            (the activation of a sampled token, whose ``values`` are sampling priorities).
    """

    def __init__(
        self,
        n_latents: int,
        n_layers: int,
        top_n: int = 16,
        device: torch.device | str = "cpu",
        with_payload: bool = False,
    ) -> None:
        if n_latents < 1 or n_layers < 1 or top_n < 1:
            raise MLSAEError(
                f"TopContexts needs n_latents, n_layers and top_n >= 1, got {n_latents}, "
                f"{n_layers}, {top_n}: pass the MLSAE's sizes and a positive --top-n"
            )
        self.n_latents, self.n_layers, self.top_n = n_latents, n_layers, top_n
        self.device = torch.device(device)
        shape = (n_latents, n_layers, top_n)
        self.values = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.positions = torch.full(shape, EMPTY_POSITION, dtype=torch.int64, device=self.device)
        self.payload: Tensor | None = (
            torch.zeros(shape, dtype=torch.float32, device=self.device) if with_payload else None
        )
        self.n_tokens = 0

    # ------------------------------------------------------------------ updates

    def update(
        self, indices: Tensor, values: Tensor, positions: Tensor, payload: Tensor | None = None
    ) -> None:
        """Fold in one batch of top-k codes.

        Args:
            indices: ``[tokens, n_layers, k]`` latent indices (the SAE's ``encode_topk``).
            values: ``[tokens, n_layers, k]`` post-ReLU activations; zeros are ignored.
            positions: ``[tokens]`` global token positions, distinct from earlier updates'.
            payload: ``[tokens, n_layers, k]``, kept with each entry (tables built
                ``with_payload`` only).
        """
        if indices.ndim != 3 or indices.shape != values.shape or indices.shape[1] != self.n_layers:
            raise MLSAEError(
                f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must both be "
                f"[tokens, {self.n_layers}, k]: pass the SAE's top-k output for every layer"
            )
        if positions.shape != indices.shape[:1]:
            raise MLSAEError(
                f"positions has shape {tuple(positions.shape)}; expected [{indices.shape[0]}], "
                "one position per token"
            )
        idx = indices.to(self.device, torch.int64)
        vals = values.to(self.device, torch.float32)
        pos = positions.to(self.device, torch.int64)
        layer = torch.arange(self.n_layers, device=self.device).view(1, -1, 1)
        keep = vals > 0
        segment = (idx * self.n_layers + layer)[keep]
        token_pos = pos.view(-1, 1, 1).expand_as(idx)[keep]
        extra = None
        if self.payload is not None:
            if payload is None or payload.shape != indices.shape:
                raise MLSAEError("this table keeps a payload: pass one per (token, layer, slot)")
            extra = payload.to(self.device, torch.float32)[keep]
        self._merge_triples(segment, vals[keep], token_pos, extra)
        self.n_tokens += int(indices.shape[0])

    def merge(self, other: TopContexts) -> TopContexts:
        """Fold in another table over *disjoint* tokens (e.g. another shard of the test split)."""
        mine = (self.n_latents, self.n_layers, self.top_n)
        theirs = (other.n_latents, other.n_layers, other.top_n)
        if mine != theirs:
            raise MLSAEError(
                f"cannot merge TopContexts of (d_sae, n_layers, top_n) {theirs} into {mine}: "
                "merge only tables of the same MLSAE and --top-n"
            )
        vals = other.values.to(self.device).reshape(-1)
        pos = other.positions.to(self.device).reshape(-1)
        keep = pos != EMPTY_POSITION
        segment = torch.arange(vals.shape[0], device=self.device) // self.top_n
        extra = None
        if self.payload is not None:
            if other.payload is None:
                raise MLSAEError("cannot merge a table without payload into one with payload")
            extra = other.payload.to(self.device).reshape(-1)[keep]
        self._merge_triples(segment[keep], vals[keep], pos[keep], extra)
        self.n_tokens += other.n_tokens
        return self

    def _merge_triples(
        self, segment: Tensor, value: Tensor, position: Tensor, payload: Tensor | None = None
    ) -> None:
        """Segmented top-N of the current tables plus new (segment, value, position) triples.

        Only the segments the triples touch are read and written: the batch's own best
        ``top_n`` per segment are laid next to the stored ones in a ``[segments, 2N]`` table,
        which is sorted row-wise and cut back to ``N``.
        """
        if segment.numel() == 0:
            return
        n = self.top_n
        order = _lexsort(segment, -value, position)
        segment, value, position = segment[order], value[order], position[order]
        if payload is not None:
            payload = payload[order]
        unique, counts, ranks = _segment_ranks(segment)
        row = torch.arange(unique.shape[0], device=self.device).repeat_interleave(counts)
        keep = ranks < n
        table_vals = self.values.view(-1, n)
        table_pos = self.positions.view(-1, n)
        cand_vals = torch.zeros(unique.shape[0], 2 * n, dtype=torch.float32, device=self.device)
        cand_pos = torch.full_like(cand_vals, EMPTY_POSITION, dtype=torch.int64)
        cand_vals[:, :n] = table_vals[unique]
        cand_pos[:, :n] = table_pos[unique]
        cand_vals[row[keep], n + ranks[keep]] = value[keep]
        cand_pos[row[keep], n + ranks[keep]] = position[keep]
        # Row-wise (value desc, position asc); empty slots (value 0) sort last.
        pos_key = torch.where(cand_pos == EMPTY_POSITION, torch.iinfo(torch.int64).max, cand_pos)
        by_pos = torch.argsort(pos_key, dim=1, stable=True)
        cand_vals, cand_pos = cand_vals.gather(1, by_pos), cand_pos.gather(1, by_pos)
        by_val = torch.argsort(cand_vals, dim=1, descending=True, stable=True)[:, :n]
        table_vals[unique] = cand_vals.gather(1, by_val)
        table_pos[unique] = cand_pos.gather(1, by_val)
        if self.payload is not None and payload is not None:
            table_extra = self.payload.view(-1, n)
            cand_extra = torch.zeros_like(cand_vals)
            cand_extra[:, :n] = table_extra[unique]
            cand_extra[row[keep], n + ranks[keep]] = payload[keep]
            cand_extra = cand_extra.gather(1, by_pos)
            table_extra[unique] = cand_extra.gather(1, by_val)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Tensors and sizes; round-trips through :meth:`from_state_dict`."""
        state: dict[str, Any] = {}
        if self.payload is not None:
            state["payload"] = self.payload.clone()
        return {
            **state,
            "values": self.values.clone(),
            "positions": self.positions.clone(),
            "n_latents": self.n_latents,
            "n_layers": self.n_layers,
            "top_n": self.top_n,
            "n_tokens": self.n_tokens,
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], device: torch.device | str = "cpu"
    ) -> TopContexts:
        """A table holding ``state`` (as written by :meth:`state_dict`)."""
        top = cls(
            int(state["n_latents"]),
            int(state["n_layers"]),
            int(state["top_n"]),
            device,
            with_payload="payload" in state,
        )
        expected = (top.n_latents, top.n_layers, top.top_n)
        for name in ("values", "positions", *(("payload",) if "payload" in state else ())):
            if tuple(state[name].shape) != expected:
                raise MLSAEError(
                    f"the saved top-context {name} have shape {tuple(state[name].shape)}, not "
                    f"{expected}: the file is damaged; rerun the analysis with --overwrite"
                )
        top.values = state["values"].to(top.device, torch.float32).clone()
        top.positions = state["positions"].to(top.device, torch.int64).clone()
        if "payload" in state:
            top.payload = state["payload"].to(top.device, torch.float32).clone()
        top.n_tokens = int(state["n_tokens"])
        return top


def valid_token_positions(special_mask: Tensor, start: int, stop: int) -> Tensor:
    """Flattened-test-split positions of the non-special tokens of contexts ``start:stop``, in
    the order :func:`mlsae_lens.activations.valid_token_vectors` returns their vectors."""
    context_size = special_mask.shape[1]
    flat = torch.arange(start * context_size, stop * context_size)
    return flat[~special_mask[start:stop].reshape(-1).cpu()]


@torch.inference_mode()
def decoder_logit_lens(
    W_dec: Tensor,
    W_U: Tensor,
    n: int = 10,
    chunk: int = 256,
    final_norm: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``n`` most positive and most negative logit effects of each decoder row.

    With ``final_norm`` (the model's ``ln_final``), the effect of row ``d_j`` is

        e_j = (final_norm(d_j) - final_norm(0)) @ W_U,   minus its mean over the vocabulary:

    the logits the model's final norm and unembedding give a residual stream equal to the
    direction ``d_j``, without the parts that do not depend on the latent (the norm's bias and
    ``b_U``, the same for every latent) and relative to the mean logit (a softmax ignores a
    shift). The norm divides by the direction's RMS (LayerNorm also removes its mean), so these
    are the logits of a residual of unit RMS along ``d_j``, in nats of log-odds between tokens.
    The numbers are the same whether TransformerLens folded the norm (``fold_ln`` moves its
    weight into ``W_U`` and its bias into ``b_U``, ``center_unembed`` shifts every row of
    ``W_U``) or not. Without ``final_norm`` they are the bare ``d_j @ W_U`` (only their order
    within a row is meaningful). Rows are done ``chunk`` at a time so the ``[d_sae, d_vocab]``
    product never exists whole.

    Returns:
        ``(top_ids, top_values, bottom_ids, bottom_values)``, each ``[d_sae, n]``; the bottom
        ones start with the most negative.
    """
    n = min(n, W_U.shape[1])
    W_U = W_U.to(W_dec.device, torch.float32)
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for start in range(0, W_dec.shape[0], chunk):
        rows = W_dec[start : start + chunk].float()
        if final_norm is not None:
            rows = final_norm(rows).float() - final_norm(torch.zeros_like(rows[:1])).float()
        logits = rows @ W_U
        if final_norm is not None:
            logits -= logits.mean(1, keepdim=True)
        top = logits.topk(n, dim=1)
        bottom = logits.topk(n, dim=1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    top_ids, top_vals, bottom_ids, bottom_vals = (torch.cat(p).cpu() for p in zip(*parts))
    return top_ids, top_vals, bottom_ids, bottom_vals


def co_appearing_latents(
    top: TopContexts, latents: Tensor, n: int = 5
) -> tuple[Tensor, Tensor]:
    """For each of ``latents``, the ``n`` other latents that most often share one of its
    collected (token, layer) entries, i.e. whose own top-N list holds the same token at the
    same layer.

    This counts co-appearance among the *collected* contexts only (strong activations), not
    co-activation over all tokens.

    Returns:
        ``(partners, counts)``, each ``[len(latents), n]``; -1 and 0 where fewer exist.
        Ties in count go to the smaller latent id.
    """
    partners = torch.full((latents.shape[0], n), -1, dtype=torch.int64)
    counts = torch.zeros(latents.shape[0], n, dtype=torch.int64)
    pos = top.positions.cpu()
    filled = pos != EMPTY_POSITION
    latent_of, layer_of, _ = filled.nonzero(as_tuple=True)
    key = pos[filled] * top.n_layers + layer_of
    if key.numel() == 0 or latents.numel() == 0:
        return partners, counts
    order = _lexsort(key, latent_of)
    key, latent_of = key[order], latent_of[order]
    _, group_size, _ = _segment_ranks(key)
    group_start = (group_size.cumsum(0) - group_size).repeat_interleave(group_size)
    group_size = group_size.repeat_interleave(group_size)
    wanted = torch.zeros(top.n_latents, dtype=torch.bool)
    wanted[latents.cpu()] = True
    left = wanted[latent_of].nonzero().squeeze(1)  # entries of the asked-for latents
    reps = group_size[left]
    left = left.repeat_interleave(reps)
    offset = torch.arange(left.shape[0]) - (reps.cumsum(0) - reps).repeat_interleave(reps)
    right = group_start[left] + offset
    a, b = latent_of[left], latent_of[right]
    a, b = a[a != b], b[a != b]
    pair, pair_count = torch.unique(a * top.n_latents + b, return_counts=True)
    a, b = pair // top.n_latents, pair % top.n_latents
    order = _lexsort(a, -pair_count, b)
    a, b, pair_count = a[order], b[order], pair_count[order]
    _, _, rank = _segment_ranks(a)
    keep = rank < n
    row_of = torch.full((top.n_latents,), -1, dtype=torch.int64)
    row_of[latents.cpu()] = torch.arange(latents.shape[0])
    partners[row_of[a[keep]], rank[keep]] = b[keep]
    counts[row_of[a[keep]], rank[keep]] = pair_count[keep]
    return partners, counts


__all__ = [
    "EMPTY_POSITION",
    "TopContexts",
    "co_appearing_latents",
    "decoder_logit_lens",
    "valid_token_positions",
]
