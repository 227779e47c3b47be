"""``MultiLayerActivationsStore``: SAELens' ``ActivationsStore`` over every layer's residual stream.

``next_batch()`` returns ``[train_batch_size_tokens, n_layers, d_in]``: each token's
``blocks.{l}.hook_resid_post`` vectors travel together, so the loss can be taken per layer.

What SAELens does, unchanged: the dataset (a hub name loaded by ``datasets``, or a
``datasets.Dataset`` passed as ``override_dataset``), the column detection (``tokens`` /
``input_ids`` used as they are; ``text`` tokenized on the fly and packed by
``concat_and_batch_sequences`` with its BOS and separator handling), epochs
(``get_batch_tokens``), ``n_dataset_processed`` and the special-token exclusion
(``exclude_special_tokens``, dropped rather than zeroed).

What this subclass changes, and why:

* ``get_activations``: one forward per batch of contexts writes every layer into one tensor and
  stops after the last block (:func:`mlsae_lens.activations.harvest_resid_post`), also on a
  TransformerBridge, instead of ``run_with_cache`` over one hook.
* the data loader. SAELens' mixing buffer keeps half of its tokens across refills and draws its
  permutation from the global RNG, so no checkpoint can restore it. Here the context stream is
  cut into chunks of ``n_batches_in_buffer`` contexts (SAELens 6.54's buffer is
  ``n_batches_in_buffer x context_size`` tokens); chunk ``c``'s valid vectors are shuffled by a
  generator seeded with ``(seed, c)`` and cut into batches, the ragged rest dropped. The position
  ``(chunk, batch_in_chunk)`` is the whole data state: a resumed run re-harvests its chunk and
  skips the batches it used, so ``--resume`` ends bitwise equal to an uninterrupted run.
* a map-style dataset is read in a seeded permutation of its rows (SAELens reads rows in order,
  and a packed corpus in order puts one document's contexts in one chunk).
* under ``torchrun`` the forward passes of a chunk are dealt to the ranks round robin and each
  result is broadcast from its owner, so every rank holds the same chunk.
* ``use_cached_activations`` reads an ``mlsae-lens cache`` directory
  (:mod:`mlsae_lens.activation_cache`): SAELens' cache holds one hook per column and its
  multi-hook mode has no cache.
"""

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset
from sae_lens import ActivationsStore
from sae_lens.training.activations_store import _filter_buffer_acts
from safetensors.torch import load_file
from torch import Tensor

from mlsae_lens.activation_cache import ActivationCache
from mlsae_lens.activations import (
    check_finite,
    chunk_shuffle,
    context_order,
    harvest_resid_post,
    resid_post_hook_names,
)
from mlsae_lens.distributed import is_distributed
from mlsae_lens.errors import MLSAEError

# SAELens compares dataset rows (contexts here) with training tokens and warns of epochs that
# are not there; mlsae-lens says how many passes a run makes itself (run_dir.passes_over_data).
_ROWS_VS_TOKENS = "The training dataset contains fewer samples"
# SAELens copies each torch-formatted row with torch.tensor(row), which warns once per process.
_COPY_CONSTRUCT = "To copy construct from a tensor"


class MultiLayerActivationsStore(ActivationsStore):
    """All-layer activations, shuffled in deterministic chunks (see the module docstring)."""

    n_layers: int
    seed: int
    contexts_per_chunk: int
    cache: ActivationCache | None = None  # set when reading an mlsae-lens activation cache

    @classmethod
    def from_config(cls, model: Any, cfg: Any, override_dataset: Any = None) -> "MultiLayerActivationsStore":
        """SAELens' ``from_config`` (every field as SAELens reads it), then the multi-layer state."""
        if cfg.seqpos_slice not in ((None,), (None, None)):
            raise MLSAEError("seqpos_slice is not supported by a multi-layer SAE; every position of a "
                             "context is trained (special tokens are excluded with exclude_special_tokens)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ROWS_VS_TOKENS)
            store = super().from_config(model, cfg, override_dataset=override_dataset)
        assert isinstance(store, cls)
        store.setup_layers(
            n_layers=cfg.sae.n_layers,
            seed=cfg.seed,
            contexts_per_chunk=cfg.n_batches_in_buffer,
            cache_dir=cfg.cached_activations_path if cfg.use_cached_activations else None,
        )
        return store

    def setup_layers(self, n_layers: int, seed: int, contexts_per_chunk: int, cache_dir: str | None = None) -> None:
        """The multi-layer state: hooks, chunking, the row order and (optionally) the cache."""
        if contexts_per_chunk <= 0:
            raise MLSAEError(f"n_batches_in_buffer (contexts per chunk) must be positive, got {contexts_per_chunk}")
        self.n_layers, self.seed, self.contexts_per_chunk = n_layers, seed, contexts_per_chunk
        self._hook_names = resid_post_hook_names(n_layers)
        self._hook_d_ins = dict.fromkeys(self._hook_names, self.d_in)
        self.chunk, self.batch_in_chunk = 0, 0
        self._next_sequence = 0
        # A map-style pre-tokenized dataset: one row is one context, so the stream has n_rows
        # contexts per epoch and a chunk never spans two epochs.
        self.n_rows: int | None = None
        if isinstance(self.dataset, Dataset) and self.is_dataset_tokenized:
            self.n_rows = len(self.dataset)
            if self.n_rows == 0:
                raise MLSAEError("the training dataset has no rows; use a larger corpus")
            self.context_order = context_order(self.n_rows, seed)
            self.rows_in_order = self.dataset  # for estimates that read the corpus from its start
            self.dataset = self.dataset.select(self.context_order.tolist())
            self.reset_sequences()
        if cache_dir is not None:
            if self.n_rows is None:
                raise MLSAEError("an activation cache needs a pre-tokenized in-memory dataset "
                                 "(datasets.Dataset with input_ids rows) to map contexts to cached rows")
            self.cache = ActivationCache(Path(cache_dir))

    # ---- SAELens' seams -----------------------------------------------------------------

    def load_cached_activation_dataset(self) -> None:
        """Not SAELens' arrow cache: an ``mlsae-lens cache`` directory is opened in ``setup_layers``."""
        return None

    @torch.no_grad()
    def get_activations(self, batch_tokens: Tensor) -> Tensor:
        """``[batch, context, n_layers, d_in]`` (float32) from one forward that stops after the last
        block; under bfloat16 autocast when ``autocast_lm`` is set, as SAELens does."""
        device_type = torch.device(self.model.cfg.device).type
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.autocast_lm):
            return harvest_resid_post(self.model, batch_tokens)

    def get_data_loader(self) -> Iterator[Tensor]:
        return self.batches()

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "n_dataset_processed": torch.tensor(self.n_dataset_processed),
            "chunk": torch.tensor(self.chunk),
            "batch_in_chunk": torch.tensor(self.batch_in_chunk),
        }

    def load(self, file_path: str) -> None:
        state = load_file(file_path)
        self.set_position(int(state["chunk"]), int(state["batch_in_chunk"]))

    # ---- the chunked stream -------------------------------------------------------------

    def set_position(self, chunk: int, batch_in_chunk: int) -> None:
        """Continue from a saved position: the next batch is ``batch_in_chunk`` of ``chunk``."""
        self.chunk, self.batch_in_chunk = chunk, batch_in_chunk
        self._dataloader = None

    @property
    def n_chunks(self) -> int | None:
        """Chunks per epoch of a map-style dataset (None for a streamed one)."""
        return None if self.n_rows is None else -(-self.n_rows // self.contexts_per_chunk)

    def reset_sequences(self) -> None:
        self.iterable_sequences = self._iterate_tokenized_sequences()
        self._next_sequence = 0

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        """The chunk's first sequence and its number of contexts (the last chunk of a map-style
        dataset may be short). ``chunk`` is already wrapped to the epoch (``harvest_chunk``)."""
        start = chunk * self.contexts_per_chunk
        if self.n_rows is None:
            return start, self.contexts_per_chunk
        return start, min(self.contexts_per_chunk, self.n_rows - start)

    def seek(self, sequence: int) -> None:
        """Move the token iterator to ``sequence`` of the stream (within an epoch for map-style
        datasets); skipping reads tokens only, no forward pass."""
        if sequence < self._next_sequence:
            self.reset_sequences()
        while self._next_sequence < sequence:
            n = min(1024, sequence - self._next_sequence)
            self.pull_tokens(n)

    def pull_tokens(self, n: int) -> Tensor:
        """The next ``n`` contexts ``[n, context_size]`` through SAELens' ``get_batch_tokens``."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_COPY_CONSTRUCT)
            try:
                tokens = self.get_batch_tokens(batch_size=n, move_to_model_device=False)
            except StopIteration:  # SAELens restarts the epoch once; an empty one ends it
                raise MLSAEError(
                    f"the dataset holds no context of {self.context_size} tokens (its text is shorter, or "
                    "every row is empty); use more text or a smaller context_size"
                ) from None
        self._next_sequence += n
        return tokens

    def tokens_for_estimates(self, n_tokens: int) -> Tensor:
        """Contexts ``[n, context_size]`` from the start of the corpus holding at least
        ``n_tokens`` tokens (all of a smaller map-style dataset), for statistics such as the
        per-layer means; the training position is left where it is."""
        n = -(-n_tokens // self.context_size) * 2  # special tokens may be excluded later
        if self.n_rows is not None:
            rows = self.rows_in_order.select(range(min(n, self.n_rows)))[self.tokens_column]
            return torch.stack([torch.as_tensor(row[: self.context_size]) for row in rows]).long()
        saved = self.iterable_sequences, self._next_sequence, self.n_dataset_processed
        try:
            self.reset_sequences()
            return self.pull_tokens(n).long()
        finally:
            self.iterable_sequences, self._next_sequence, self.n_dataset_processed = saved

    def harvest_chunk(self, chunk: int) -> Tensor:
        """Valid-token vectors ``[n, n_layers, d_in]`` of one chunk, shuffled deterministically."""
        if self.n_chunks is not None:
            chunk = chunk % self.n_chunks  # epochs repeat the same chunks
        start, size = self.chunk_span(chunk)
        per_forward = self.store_batch_size_prompts
        parts = []
        if self.cache is None:
            self.seek(start)
        for group, offset in enumerate(range(0, size, per_forward)):
            n = min(per_forward, size - offset)
            if self.cache is not None:
                ids = self.context_order[start + offset : start + offset + n]
                parts.append(self.read_group(group, ids, chunk))
            else:
                parts.append(self.harvest_group(group, self.pull_tokens(n), chunk))
        vectors = torch.cat(parts)
        return vectors[chunk_shuffle(vectors.shape[0], self.seed, chunk).to(vectors.device)]

    def harvest_group(self, group: int, tokens: Tensor, chunk: int) -> Tensor:
        """Valid-token vectors of one model forward (under torchrun: run by rank
        ``group % world_size`` and broadcast to the others)."""
        if is_distributed():
            owner = group % dist.get_world_size()
            if dist.get_rank() != owner:
                n_valid = int((~self.excluded_mask(tokens)).sum())
                part = torch.empty(n_valid, self.n_layers, self.d_in, device=self.device)
                dist.broadcast(part, src=owner)
                return part
        acts = self.get_activations(tokens)
        check_finite(acts, f"chunk {chunk}")
        flat = acts.reshape(-1, self.n_layers, self.d_in).to(self.device)
        part = _filter_buffer_acts((flat, tokens.reshape(-1).to(self.device)), self.exclude_special_tokens)
        if is_distributed():
            part = part.contiguous()
            dist.broadcast(part, src=dist.get_rank())
        return part

    def read_group(self, group: int, context_ids: Tensor, chunk: int) -> Tensor:  # noqa: ARG002
        """The cached valid-token vectors of ``context_ids`` (the cache holds valid tokens only)."""
        return torch.cat([self.cache.context_rows(int(c)) for c in context_ids]).to(self.device)

    def excluded_mask(self, tokens: Tensor) -> Tensor:
        """Where ``tokens`` holds an ``exclude_special_tokens`` id (the positions SAELens'
        ``_filter_buffer_acts`` drops)."""
        if self.exclude_special_tokens is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.exclude_special_tokens.to(tokens.device))

    def batches(self) -> Iterator[Tensor]:
        """Batches from the current position on, forever; the position moves as they are taken."""
        bs = self.train_batch_size_tokens
        empty_chunks = 0
        while True:
            chunk, skip = self.chunk, self.batch_in_chunk
            vectors = self.harvest_chunk(chunk)
            n_batches = vectors.shape[0] // bs
            empty_chunks = empty_chunks + 1 if n_batches == 0 else 0
            if empty_chunks >= (self.n_chunks or 64):
                raise MLSAEError(
                    f"no chunk holds a full batch of {bs} tokens; lower --batch-size-tokens "
                    "(train_batch_size_tokens) or raise --contexts-per-chunk (n_batches_in_buffer)"
                )
            for b in range(skip, n_batches):
                self.batch_in_chunk = b + 1
                yield vectors[b * bs : (b + 1) * bs]
            self.chunk, self.batch_in_chunk = chunk + 1, 0
