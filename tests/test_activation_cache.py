"""The activation cache: one harvest, read back as the live stream; damage is named."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_crash_resume import tiny_config, tiny_model, tiny_splits

from mlsae_lens import MLSAEError
from mlsae_lens.activation_cache import MANIFEST, ActivationCache, write_activation_cache
from mlsae_lens.run_training import TrainingRun


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    return write_activation_cache(tiny_config(out / "unused"), out, model=tiny_model(), splits=tiny_splits(),
                                  contexts_per_shard=10)


def runner(out: Path, cache: Path | None = None, **overrides) -> TrainingRun:
    cfg = tiny_config(out, training_tokens=15 * 8, activation_cache=str(cache) if cache else None, **overrides)
    return TrainingRun(cfg, model=tiny_model(), splits=tiny_splits())


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The final SAEs of two runs agree (a cached stream trains what the live one does)."""
    a = load_file(run_a / "sae_weights.safetensors")
    b = load_file(run_b / "sae_weights.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_the_cache_yields_the_live_streams_batches_and_trains_the_same_sae(tmp_path, cache_dir) -> None:
    live, cached = runner(tmp_path / "live"), runner(tmp_path / "cached", cache_dir)
    assert isinstance(cached.activations_store.cache, ActivationCache)
    for chunk in (0, 3, 9):  # chunk 9 wraps to the second epoch
        torch.testing.assert_close(cached.activations_store.harvest_chunk(chunk), live.activations_store.harvest_chunk(chunk),
                                   rtol=1e-6, atol=1e-6)
    live.run()
    cached.run()
    assert_same_weights(tmp_path / "live", tmp_path / "cached")
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    assert manifest["normalization"].startswith("raw") and len(manifest["shards"]) == 4
    assert sum(s["rows"] for s in manifest["shards"]) == int((tiny_splits().train != 0).sum())


def shard_context(cache: Path, shard: int) -> int:
    """A training context held by the given shard (shards hold contexts in the stream's order)."""
    return json.loads((cache / MANIFEST).read_text())["shards"][shard]["context_ids"][0]


def copy_cache(cache_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(cache_dir, tmp_path / "copy"))


def test_a_corrupted_or_truncated_shard_is_named(tmp_path, cache_dir) -> None:
    cache = copy_cache(cache_dir, tmp_path)
    shard = cache / "train" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = runner(tmp_path / "a", cache).activations_store
    with pytest.raises(MLSAEError, match="shard_00001.safetensors is corrupted \\(sha256 mismatch\\)"):
        for chunk in range(store.n_chunks):
            store.harvest_chunk(chunk)
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(MLSAEError, match="shard_00001.safetensors is missing or truncated"):
        runner(tmp_path / "b", cache).activations_store.cache.context_rows(shard_context(cache, 1))


def test_a_cache_of_another_model_or_corpus_is_refused(tmp_path, cache_dir) -> None:
    with pytest.raises(MLSAEError, match="does not match this run: seed \\(cache: 3, run: 4\\)"):
        runner(tmp_path / "a", cache_dir, seed=4)
    other = tiny_splits()
    other.train[0, 0] += 1  # another corpus under the same settings
    with pytest.raises(MLSAEError, match="does not match this run: the training tokens"):
        TrainingRun(tiny_config(tmp_path / "t", activation_cache=str(cache_dir)),
                                    model=tiny_model(), splits=other)
    with pytest.raises(MLSAEError, match="does not match this run: context_size"):
        runner(tmp_path / "b", cache_dir, context_size=12)
    cache = copy_cache(cache_dir, tmp_path)
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["d_model"] = 32
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MLSAEError, match="d_model \\(cache: 32, run: 16\\)"):
        runner(tmp_path / "c", cache)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "train/../../x.safetensors"])
def test_manifest_paths_cannot_escape_the_cache(tmp_path, cache_dir, name) -> None:
    cache = copy_cache(cache_dir, tmp_path)
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["shards"][0]["file"] = name
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MLSAEError, match="outside its directory"):
        runner(tmp_path / "a", cache)


def test_a_pickle_in_place_of_a_shard_is_refused(tmp_path, cache_dir) -> None:
    cache = copy_cache(cache_dir, tmp_path)
    shard = cache / "train" / "shard_00000.safetensors"
    torch.save({"acts": torch.zeros(1)}, shard)
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["shards"][0]["bytes"] = shard.stat().st_size
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MLSAEError, match="is a pickle/torch.save file"):
        runner(tmp_path / "a", cache).activations_store.cache.context_rows(shard_context(cache, 0))


def test_a_missing_cache_or_an_existing_one_is_named(tmp_path, cache_dir) -> None:
    with pytest.raises(MLSAEError, match="is not an activation cache"):
        runner(tmp_path / "a", tmp_path / "nothing")
    with pytest.raises(MLSAEError, match="already holds an activation cache"):
        write_activation_cache(tiny_config(tmp_path / "x"), cache_dir, model=tiny_model(), splits=tiny_splits())


def test_cache_files_get_the_umask_mode_like_every_other_file(cache_dir) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in cache_dir.rglob("*"):  # the root is pytest's own (0700) directory
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, path
def test_the_cache_holds_only_what_its_token_budget_reads_and_says_its_size_first(tmp_path, caplog) -> None:
    budget = 15 * 4
    with caplog.at_level("INFO", logger="mlsae_lens"):
        cache = write_activation_cache(tiny_config(tmp_path / "unused", training_tokens=budget), tmp_path / "c",
                                       model=tiny_model(), splits=tiny_splits(), contexts_per_shard=3)
    manifest = json.loads((cache / MANIFEST).read_text())
    held = [c for shard in manifest["shards"] for c in shard["context_ids"]]
    assert 0 < len(held) < tiny_splits().train.shape[0] and len(set(held)) == len(held)
    (announced,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("activation cache:")]
    rows = sum(s["rows"] for s in manifest["shards"])
    assert f"{len(held)} of {tiny_splits().train.shape[0]} training contexts ({rows} tokens" in announced
    acts_bytes = rows * 2 * 16 * 4  # rows x n_layers x d_model x float32
    assert acts_bytes <= sum(s["bytes"] for s in manifest["shards"]) < acts_bytes * 1.5 + 4096

    # A run within the budget trains from it like the live stream; a larger one is refused up front.
    def budget_runner(out: Path, tokens: int, cache: Path | None = None) -> TrainingRun:
        cfg = tiny_config(out, training_tokens=tokens, activation_cache=str(cache) if cache else None)
        return TrainingRun(cfg, model=tiny_model(), splits=tiny_splits())

    live = budget_runner(tmp_path / "live", budget)
    cached = budget_runner(tmp_path / "cached", budget, cache)
    live.run()
    cached.run()
    assert_same_weights(tmp_path / "live", tmp_path / "cached")
    with pytest.raises(MLSAEError, match=f"holds {len(held)} of the .* this run needs .* --training-tokens 600"):
        budget_runner(tmp_path / "more", 600, cache)


def test_a_cache_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(MLSAEError, match=r"the activation cache needs .* kB but .* has 1.0 kB free; lower "
                                         r"--training-tokens or choose another --output"):
        write_activation_cache(tiny_config(tmp_path / "unused"), tmp_path / "c", model=tiny_model(),
                               splits=tiny_splits())
    assert not (tmp_path / "c").exists()


def test_cache_output_that_is_a_file_is_named(tmp_path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(MLSAEError, match="--output .*f is a file; choose a directory"):
        write_activation_cache(tiny_config(tmp_path / "unused"), tmp_path / "f", model=tiny_model(),
                               splits=tiny_splits())
