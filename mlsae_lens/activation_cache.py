"""A reusable activation cache: harvest all layers once, train many SAEs from disk.

``mlsae-lens cache --output DIR`` runs the model once over the contexts a run of
``--training-tokens`` visits (in the stream's order, whole chunks; the whole split when the
budget asks for more than one pass) and writes ``DIR/train/shard_NNNNN.safetensors`` (``acts`` ``[rows, n_layers, d_model]`` float32: the
*raw* residual stream of the valid tokens, so every SAE applies its own normalization;
``positions`` ``[rows, 2]`` (context, position); ``row_offsets`` per context) and
``DIR/manifest.json`` (model, sizes, corpus settings, a sha256 of the training tokens, and
per shard its context ids, size and sha256). It says the size before writing and refuses
when the disk lacks the room. ``--activation-cache DIR`` then trains from it
through :class:`ActivationCache`, read by the activations store, which yields exactly the batches the live stream
would (same context order and shuffle), so ``--resume`` works unchanged.

Only JSON and safetensors are read; a shard whose checksum or size is wrong, a manifest
describing another model or corpus, or a path escaping ``DIR`` is refused by name.
"""

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mlsae_lens.activations import (
    check_finite,
    context_order,
    harvest_resid_post,
    valid_token_vectors,
)
from mlsae_lens.checkpoint import atomic_save_file, atomic_write_json, check_not_pickle
from mlsae_lens.errors import MLSAEError
from mlsae_lens.memory import resolve_model_batch_size

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: shards list their context ids (a budget harvests a subset); 1 is still read
READABLE_VERSIONS = (1, 2)
# Run settings that decide which activations a run sees: they must match the cache's.
MATCHED_FIELDS = ("model_name", "dataset", "text_column", "context_size", "test_fraction",
                  "max_corpus_tokens", "seed")


def tokens_sha256(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_member(root: Path, name: str) -> Path:
    """``root / name`` for a relative path that stays inside ``root``."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise MLSAEError(f"{root / MANIFEST} names the file {name!r} outside its directory; the cache is "
                         "damaged or hostile — write it again with `mlsae-lens cache`")
    return root / name


def contexts_for_budget(order: Tensor, n_valid: Tensor, contexts_per_chunk: int, batch_size_tokens: int,
                        training_tokens: int) -> list[int]:
    """The contexts a run of ``training_tokens`` reads, in the order the store visits them
    (``order``, :func:`mlsae_lens.activations.context_order`): whole chunks until their full
    batches cover the budget (every context after one pass). ``n_valid``: valid tokens per context."""
    needed: list[int] = []
    trained = 0
    for start in range(0, order.shape[0], contexts_per_chunk):
        ids = order[start : start + contexts_per_chunk]
        needed.extend(ids.tolist())
        trained += int(n_valid[ids].sum()) // batch_size_tokens * batch_size_tokens
        if trained >= training_tokens:
            break
    return needed


def check_disk_room(output: Path, n_bytes: int) -> None:
    """Refuse before writing when the file system of ``output`` has less than ``n_bytes`` free."""
    existing = next(p for p in [output, *output.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < n_bytes:
        raise MLSAEError(f"the activation cache needs {format_bytes(n_bytes)} but {existing} has "
                         f"{format_bytes(free)} free; lower --training-tokens or choose another --output")


def format_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_activation_cache(
    cfg: Any,
    output: Path,
    model: Any = None,
    splits: Any = None,
    contexts_per_shard: int = 256,
) -> Path:
    """Harvest the training split of ``cfg`` (a :class:`MultiLayerRunnerConfig`) into ``output``."""
    from mlsae_lens.data import special_token_mask
    from mlsae_lens.models import load_model
    from mlsae_lens.sources import resolve_device

    output = Path(output)
    if (output / MANIFEST).exists():
        raise MLSAEError(f"{output} already holds an activation cache; choose a new --output")
    if output.exists() and not output.is_dir():
        raise MLSAEError(f"--output {output} is a file; choose a directory for the activation cache")
    if contexts_per_shard <= 0:
        raise MLSAEError("--contexts-per-shard must be positive")
    device = resolve_device(cfg.device)
    model = model if model is not None else load_model(cfg.model_name, device=device, backend=cfg.model_backend)
    splits = splits if splits is not None else cfg.load_token_splits(model.tokenizer)
    tokens, mask = splits.train, special_token_mask(splits.train, model.tokenizer)
    contexts = contexts_for_budget(context_order(tokens.shape[0], cfg.seed), (~mask).sum(1),
                                   cfg.contexts_per_chunk, cfg.batch_size_tokens, cfg.training_tokens)
    rows = int((~mask[contexts]).sum())
    # float32 activations of every layer, plus two int64 positions per row.
    n_bytes = rows * (model.cfg.n_layers * model.cfg.d_model * 4 + 16)
    logger.info("activation cache: %d of %d training contexts (%d tokens, for --training-tokens %d) x %d layers "
                "x d_model %d: %s", len(contexts), tokens.shape[0], rows, cfg.training_tokens,
                model.cfg.n_layers, model.cfg.d_model, format_bytes(n_bytes))
    check_disk_room(output, n_bytes)
    (output / "train").mkdir(parents=True, exist_ok=True)
    batch = resolve_model_batch_size(cfg.model_batch_size, model.cfg, tokens.shape[1], device)
    shards = []
    for index, start in enumerate(range(0, len(contexts), contexts_per_shard)):
        ids = torch.tensor(contexts[start : start + contexts_per_shard], dtype=torch.long)
        parts = []
        for i in range(0, len(ids), batch):
            group = ids[i : i + batch]
            acts = harvest_resid_post(model, tokens[group])
            check_finite(acts, f"contexts {group.tolist()}")
            parts.append(valid_token_vectors(acts, mask[group]).cpu())
        valid = ~mask[ids]
        positions = valid.nonzero()
        positions[:, 0] = ids[positions[:, 0]]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), valid.sum(1).cumsum(0)])
        name = f"train/shard_{index:05d}.safetensors"
        atomic_save_file({"acts": torch.cat(parts), "positions": positions, "row_offsets": offsets}, output / name)
        shards.append({"file": name, "context_ids": ids.tolist(), "rows": int(offsets[-1]),
                       "bytes": (output / name).stat().st_size, "sha256": file_sha256(output / name)})
    manifest = {
        "format_version": FORMAT_VERSION,
        "normalization": "raw: unnormalized hook_resid_post; each SAE normalizes its input itself",
        "d_model": model.cfg.d_model,
        "n_layers": model.cfg.n_layers,
        "hook_names": [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)],
        "n_train_contexts": int(tokens.shape[0]),
        # The budget the contexts were chosen for (see contexts_for_budget).
        "training_tokens": cfg.training_tokens,
        "contexts_per_chunk": cfg.contexts_per_chunk,
        "batch_size_tokens": cfg.batch_size_tokens,
        "train_tokens_sha256": tokens_sha256(tokens),
        "provenance": splits.provenance,
        **{key: getattr(cfg, key) for key in MATCHED_FIELDS},
        "shards": shards,
    }
    atomic_write_json(output / MANIFEST, manifest)  # last: a manifest means a complete cache
    return output


class ActivationCache:
    """Reads each training context's valid-token activations from a cache directory written by
    :func:`write_activation_cache` (every shard's sha256 checked the first time it is read)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.shards = self.manifest["shards"]
        # context id -> (shard, its place in the shard)
        self.where = {c: (shard, i) for shard in self.shards for i, c in enumerate(shard_context_ids(shard))}
        self.verified: set[str] = set()

    def check_run(self, run_cfg: Any, model_cfg: Any, tokens: Tensor, special_mask: Tensor) -> None:
        """Refuse a cache written for another model, corpus or a smaller budget than ``run_cfg``'s
        (an ``mlsae-lens train`` config) on the training split ``tokens``."""
    
        expected = {key: getattr(run_cfg, key) for key in MATCHED_FIELDS}
        expected.update(d_model=model_cfg.d_model, n_layers=model_cfg.n_layers)
        mismatched = mismatches(self.manifest, expected)
        if self.manifest.get("train_tokens_sha256") != tokens_sha256(tokens):
            mismatched.append("the training tokens (sha256)")
        refuse_mismatches(self.root, mismatched)
        needed = contexts_for_budget(context_order(tokens.shape[0], run_cfg.seed), (~special_mask).sum(1),
                                     run_cfg.contexts_per_chunk, run_cfg.batch_size_tokens, run_cfg.training_tokens)
        missing = set(needed) - self.where.keys()
        if missing:
            m = self.manifest
            raise MLSAEError(
                f"the activation cache {self.root} holds {len(self.where)} of the {tokens.shape[0]} training "
                f"contexts, harvested for --training-tokens {m.get('training_tokens')} --contexts-per-chunk "
                f"{m.get('contexts_per_chunk')} --batch-size-tokens {m.get('batch_size_tokens')}; this run needs "
                f"{len(missing)} more: write a cache with this run's --training-tokens {run_cfg.training_tokens} "
                f"--contexts-per-chunk {run_cfg.contexts_per_chunk} --batch-size-tokens {run_cfg.batch_size_tokens}")

    def shard_path(self, shard: dict[str, Any]) -> Path:
        """The shard's file, its sha256 checked the first time this cache reads it."""
        path = safe_member(self.root, shard["file"])
        if shard["file"] not in self.verified:
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise MLSAEError(f"activation cache shard {path} is missing or truncated; write the cache again")
            check_not_pickle(path)
            if file_sha256(path) != shard["sha256"]:
                raise MLSAEError(f"activation cache shard {path} is corrupted (sha256 mismatch); "
                                 "write the cache again")
            self.verified.add(shard["file"])
        return path

    def context_rows(self, context: int) -> Tensor:
        if context not in self.where:
            raise MLSAEError(f"the activation cache {self.root} does not hold training context {context} (it was "
                             "written for fewer --training-tokens); write a cache with this run's settings")
        shard, local = self.where[context]
        with safe_open(self.shard_path(shard), framework="pt") as f:
            start, stop = f.get_slice("row_offsets")[local : local + 2].tolist()
            return f.get_slice("acts")[start:stop]


def mismatches(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{key} (cache: {manifest.get(key)!r}, run: {value!r})"
            for key, value in expected.items() if manifest.get(key) != value]


def refuse_mismatches(root: Path, mismatched: list[str]) -> None:
    if mismatched:
        raise MLSAEError(f"the activation cache {root} does not match this run: "
                         f"{'; '.join(mismatched)}; use the cache's settings or write a new cache")


def check_cache_before_loading(run_cfg: Any) -> None:
    """``--activation-cache``: a cache written for this run's model and corpus settings, checked
    from its manifest before the model loads (sizes and tokens are checked once they are known)."""
    root = Path(run_cfg.activation_cache)
    manifest = read_manifest(root)
    refuse_mismatches(root, mismatches(manifest, {key: getattr(run_cfg, key) for key in MATCHED_FIELDS}))


def read_manifest(root: Path) -> dict[str, Any]:
    """The cache's manifest, checked for format and for paths that stay inside ``root``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise MLSAEError(f"{root} is not an activation cache (no {MANIFEST}); write one with `mlsae-lens cache`")
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        for shard in shards:
            safe_member(Path(root), shard["file"])
            _ = shard_context_ids(shard), shard["bytes"], shard["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MLSAEError(f"{path} is damaged ({type(exc).__name__}: {exc}); write the cache again") from exc
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise MLSAEError(f"{path} has format version {manifest.get('format_version')!r}, expected one of "
                         f"{READABLE_VERSIONS}; write the cache again with this mlsae-lens")
    return manifest


def shard_context_ids(shard: dict[str, Any]) -> list[int]:
    """The contexts a shard holds, in order: listed (format 2) or a range (format 1)."""
    if "context_ids" in shard:
        return [int(c) for c in shard["context_ids"]]
    start, stop = shard["contexts"]
    return list(range(int(start), int(stop)))
