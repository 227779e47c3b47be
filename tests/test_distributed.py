"""Data-parallel training on 2 gloo processes equals one process with the same global batch."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.data import TokenSplits
from mlsae_lens.distributed import global_layer_variance, is_main, local_rows, maybe_all_reduce_
from mlsae_lens.sae import per_layer_total_variance
from mlsae_lens.run_training import TrainingRun
from tiny import EosTokenizer, tiny_token_splits, tiny_transformer

EOS = 0


def tiny_model() -> HookedTransformer:
    return tiny_transformer(tokenizer=EosTokenizer())

def tiny_splits() -> TokenSplits:
    return tiny_token_splits()

def tiny_config(out: Path) -> MultiLayerRunnerConfig:
    # 15-token global batches split 8 + 7 over 2 ranks; R=16 so latents die and AuxK runs.
    return MultiLayerRunnerConfig(
        model_name="tiny", output_dir=str(out), context_size=16, expansion_factor=16, k=4,
        training_tokens=15 * 10, batch_size_tokens=15, contexts_per_chunk=4, model_batch_size=1,
        lr=1e-3, dead_tokens_threshold=30, checkpoint_every_tokens=60, log_every_steps=1, seed=3,
        device="cpu",
    )


def worker(rank: int, world_size: int, port: int, out: str, extra: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    runner = TrainingRun(tiny_config(Path(out)), model=tiny_model(), splits=tiny_splits())
    try:
        runner.run()
        # Every rank ends with the same weights and counters; only rank 0 wrote the run dir.
        state = {k: v.detach().clone() for k, v in runner.sae.state_dict().items()}
        state["tokens_since_fired"] = runner.trainer.tokens_since_fired
        save_file(state, str(Path(extra) / f"rank{rank}.safetensors"))
        (Path(extra) / f"rank{rank}.json").write_text(json.dumps(
            {"is_main": is_main(), "rows": local_rows(torch.arange(15)).tolist(),
             "max": maybe_all_reduce_(torch.tensor([rank]), "max").item()}))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, Path]:
    out, extra = tmp_path_factory.mktemp("ddp_run"), tmp_path_factory.mktemp("ddp_extra")
    mp.spawn(worker, args=(2, free_port(), str(out), str(extra)), nprocs=2, join=True)
    return out, extra


def test_two_gloo_ranks_train_the_same_sae_as_one_process(tmp_path, two_rank_run) -> None:
    out, extra = two_rank_run
    single = TrainingRun(tiny_config(tmp_path), model=tiny_model(), splits=tiny_splits())
    single.run()
    ddp = load_file(out / "sae_weights.safetensors")
    one = load_file(tmp_path / "sae_weights.safetensors")
    assert ddp.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    rank0, rank1 = load_file(extra / "rank0.safetensors"), load_file(extra / "rank1.safetensors")
    for name in rank0:  # the ranks never drift apart (same all-reduced updates)
        assert torch.equal(rank0[name], rank1[name]), name
    assert torch.equal(rank0["tokens_since_fired"], single.trainer.tokens_since_fired)
    log = json.loads((out / "training_log.json").read_text())
    assert any(row["auxk"] > 0 for row in log)  # the AuxK path ran with global denominators
    for mine, ref in zip(log, single.trainer.log, strict=True):
        for key in ("loss", "fvu", "auxk", "l0", "dead_fraction"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


def test_only_rank_zero_writes_and_each_rank_gets_its_rows(two_rank_run) -> None:
    out, extra = two_rank_run
    info = [json.loads((extra / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["is_main"] for i in info] == [True, False]
    assert info[0]["rows"] + info[1]["rows"] == list(range(15))
    assert info[0]["max"] == info[1]["max"] == 1
    written = sorted(p.name for p in out.iterdir())
    assert written == ["cfg.json", "checkpoints", "run.json", "runner_cfg.json", "sae_weights.safetensors",
                       "sparsity.safetensors", "splits.json", "training_log.json"]
    assert not (out / ".lock").exists()


def test_helpers_are_no_ops_in_one_process() -> None:
    x = torch.randn(7, 3, 5)
    assert is_main()
    assert local_rows(x) is x
    assert torch.equal(maybe_all_reduce_(x.clone()), x)
    torch.testing.assert_close(global_layer_variance(x), per_layer_total_variance(x))
