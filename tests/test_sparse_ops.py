"""The sparse TopK ops equal plain autograd: values, losses and every gradient."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from mlsae_lens import dense_ops, sparse_ops
from mlsae_lens.sae import MultiLayerTrainingSAE, MultiLayerTrainingSAEConfig
from mlsae_lens.sparse_ops import (
    SparseCode,
    aux_is_dense,
    decode_dead,
    dense_decode,
    dense_topk_encode,
    sparse_decode,
    topk_encode,
)

D_IN, D_SAE, N = 10, 40, 24
REPO = Path(__file__).resolve().parents[1]


def params(dtype: torch.dtype = torch.float64, device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    raw = {
        "x": torch.randn(N, D_IN, generator=gen),
        "b_dec": torch.randn(D_IN, generator=gen) * 0.3,
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.5,
        # Negative biases on some latents: selected pre-activations <= 0 exercise the ReLU.
        "b_enc": torch.randn(D_SAE, generator=gen) - 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.5,
    }
    return {k: v.to(device, dtype).requires_grad_() for k, v in raw.items()}


def loss_and_grads(encode, decode, p, k: int, dead: torch.Tensor | None, aux_k: int):
    code: SparseCode = encode(p["x"], p["b_dec"], p["W_enc"], p["b_enc"], k, dead, aux_k)
    codes = [(code.values, code.indices)]
    if code.aux_values is not None:
        codes.append((code.aux_values, code.aux_indices))
    decoded = decode(codes, p["W_dec"])
    if decode is sparse_decode and code.aux_values is not None:  # the SAE's AuxK decode
        decoded[1] = decode_dead(code.aux_values, code.aux_indices, dead, p["W_dec"])
    recon = decoded[0] + p["b_dec"]
    error = recon - p["x"]
    loss = error.pow(2).sum()
    if len(decoded) > 1:
        loss = loss + (decoded[1] - error.detach()).pow(2).sum() / 7
    grads = torch.autograd.grad(loss, list(p.values()))
    return code, loss, dict(zip(p, grads))


def dense_code(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return values.new_zeros(values.shape[0], D_SAE).scatter_add(-1, indices, values)


CASES = [
    (4, None, 0),
    (4, torch.arange(D_SAE) % 3 == 0, 5),
    (4, torch.arange(D_SAE) == 7, 5),  # fewer dead latents than aux_k
    (4, torch.arange(D_SAE) < 30, 1),  # many dead latents per aux_k: the sparse AuxK branch
    (1, torch.arange(D_SAE) >= 30, 3),
    (D_SAE - 1, torch.arange(D_SAE) < 20, 6),  # k = d_sae - 1: many selected values <= 0
    (D_SAE - 1, None, 0),
]


@pytest.fixture(params=[False, True], ids=["sparse-products", "gpu-style-dense-gemms"])
def backward_path(request, monkeypatch):
    """Both backward strategies (sparse products as on CPU; scatter + GEMM as on CUDA), on CPU."""
    monkeypatch.setattr(sparse_ops, "DENSE_GEMM_BACKWARD", request.param)
    return request.param


@pytest.mark.parametrize(("k", "dead", "aux_k"), CASES)
def test_sparse_encode_and_decode_equal_dense_autograd_in_values_loss_and_every_gradient(k, dead, aux_k, backward_path) -> None:
    ref_code, ref_loss, ref_grads = loss_and_grads(dense_topk_encode, dense_decode, params(), k, dead, aux_k)
    code, loss, grads = loss_and_grads(topk_encode, sparse_decode, params(), k, dead, aux_k)
    torch.testing.assert_close(dense_code(code.values, code.indices), dense_code(ref_code.values, ref_code.indices))
    if dead is None:
        assert code.aux_values is None and ref_code.aux_values is None
    else:
        assert code.aux_indices is not None and bool(dead[code.aux_indices].all())
        torch.testing.assert_close(
            dense_code(code.aux_values, code.aux_indices), dense_code(ref_code.aux_values, ref_code.aux_indices)
        )
    torch.testing.assert_close(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    assert (ref_code.values <= 0).any() == (k == D_SAE - 1)  # the ReLU case is really exercised


def test_both_auxk_branches_are_exercised_by_the_cases() -> None:
    branches = {aux_is_dense(int(dead.sum()), aux_k) for _, dead, aux_k in CASES if dead is not None}
    assert branches == {True, False}


def test_dense_auxk_cases_mix_rows_that_need_a_top_k_and_rows_that_do_not() -> None:
    """The gradient cases above cover both kinds of row of the dense AuxK block (more, or at
    most, aux_k positive dead pre-activations; see sparse_ops._dead_block)."""
    p = params()
    pre = (p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    crowded = [
        bool(((pre[:, dead] > 0).sum(1) > aux_k).any()) for _, dead, aux_k in CASES
        if dead is not None and aux_is_dense(int(dead.sum()), aux_k)
    ]
    uncrowded = [
        bool(((pre[:, dead] > 0).sum(1) <= aux_k).any()) for _, dead, aux_k in CASES
        if dead is not None and aux_is_dense(int(dead.sum()), aux_k)
    ]
    assert any(crowded) and any(uncrowded)


def test_sparse_gradients_match_in_float32_too(backward_path) -> None:
    dead = torch.arange(D_SAE) % 4 == 1
    _, ref_loss, ref_grads = loss_and_grads(dense_topk_encode, dense_decode, params(torch.float32), 3, dead, 4)
    _, loss, grads = loss_and_grads(topk_encode, sparse_decode, params(torch.float32), 3, dead, 4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_encoder_saves_no_dense_pre_activations_for_backward() -> None:
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape if t.shape != (D_IN, D_SAE) else torch.Size([0]))  # W_enc is free
        return t

    p = params()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        topk_encode(p["x"], p["b_dec"], p["W_enc"], p["b_enc"], 3, torch.arange(D_SAE) < 9, 4)
    assert saved, "the sparse encoder saved nothing: is it still differentiable?"
    assert all(shape.numel() < N * D_SAE for shape in saved)


def test_inference_mode_encode_equals_the_differentiable_one() -> None:
    p = params()
    code = topk_encode(p["x"], p["b_dec"], p["W_enc"], p["b_enc"], 5, torch.arange(D_SAE) < 9, 4)
    with torch.inference_mode():
        fast = topk_encode(p["x"], p["b_dec"], p["W_enc"], p["b_enc"], 5, torch.arange(D_SAE) < 9, 4)
    assert not fast.values.requires_grad
    torch.testing.assert_close(dense_code(fast.values, fast.indices), dense_code(code.values, code.indices).detach())
    torch.testing.assert_close(
        dense_code(fast.aux_values, fast.aux_indices), dense_code(code.aux_values, code.aux_indices).detach()
    )


def make_sae(dense: bool, aux_k: int) -> MultiLayerTrainingSAE:
    torch.manual_seed(0)
    cfg = MultiLayerTrainingSAEConfig(d_in=12, d_sae=48, k=4, n_layers=3, normalization="standardize", aux_k=aux_k)
    sae = MultiLayerTrainingSAE(cfg).double()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.dense = dense
    return sae


@pytest.mark.parametrize(
    ("dead", "aux_k"),
    [(None, 6), (torch.arange(48) % 5 == 0, 6), (torch.arange(48) == 3, 6), (torch.arange(48) < 40, 2)],
)
def test_training_step_of_sparse_and_dense_reference_sae_give_the_same_loss_and_gradients(dead, aux_k, backward_path) -> None:
    x = torch.randn(16, 3, 12, dtype=torch.float64) * 3 + 1
    outs, grads = [], []
    for dense in (True, False):
        sae = make_sae(dense, aux_k)
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        )
        out.loss.backward()
        outs.append(out)
        grads.append({name: p.grad for name, p in sae.named_parameters()})
    ref, fast = outs
    torch.testing.assert_close(fast.loss, ref.loss)
    torch.testing.assert_close(fast.losses["auxiliary_reconstruction_loss"], ref.losses["auxiliary_reconstruction_loss"])
    torch.testing.assert_close(fast.sae_out, ref.sae_out)
    assert set(grads[0]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_ops_on_cuda_equal_dense_reference_and_bf16_matmul_is_close() -> None:
    dead = (torch.arange(D_SAE) % 3 == 0).cuda()
    _, ref_loss, ref_grads = loss_and_grads(dense_topk_encode, dense_decode, params(device="cuda"), 4, dead, 5)
    _, loss, grads = loss_and_grads(topk_encode, sparse_decode, params(device="cuda"), 4, dead, 5)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    p = params(torch.float32, "cuda")
    exact = topk_encode(p["x"], p["b_dec"], p["W_enc"], p["b_enc"], 4)
    low = topk_encode(p["x"], p["b_dec"], p["W_enc"], p["b_enc"], 4, matmul_dtype=torch.bfloat16)
    assert low.values.dtype == torch.float32
    torch.testing.assert_close(low.values.sum(), exact.values.sum(), rtol=5e-2, atol=5e-2)


def test_benchmark_quick_json_reports_every_ratio() -> None:
    if os.environ.get("MLSAE_SKIP_BENCH_SMOKE"):
        pytest.skip("MLSAE_SKIP_BENCH_SMOKE is set")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(proc.stdout)
    for key in ("train_vs_saelens", "train_vs_floor", "harvest_vs_forward", "analysis_vs_encode", "analysis_memory_ratio"):
        assert result[key] > 0, key
    # The sparsify peer: timed where it is installed, reported as skipped (null) where not.
    assert (result["train_vs_sparsify"] is None) == (importlib.util.find_spec("sparsify") is None)
    assert result["train_vs_sparsify"] is None or result["train_vs_sparsify"] > 0


def test_dead_block_keeps_the_top_aux_k_after_relu_in_crowded_and_sparse_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    dead_pre = torch.randn(64, 20, generator=gen, dtype=torch.float64)
    dead_pre[::2] -= 1.5  # few positive entries: these rows skip the top-k
    aux_k = 6
    positives = (dead_pre > 0).sum(1)
    assert (positives > aux_k).any() and (positives <= aux_k).any()  # both kinds of row
    top = dead_pre.topk(aux_k, dim=-1)
    expected = torch.zeros_like(dead_pre).scatter_(1, top.indices, top.values.relu())
    for crowded_rows_only in (True, False):  # CPU's choice and the GPU's (every row through topk)
        block = sparse_ops._dead_block(dead_pre.clone(), aux_k, crowded_rows_only)
        torch.testing.assert_close(block, expected, rtol=0, atol=0)
    torch.testing.assert_close(sparse_ops._dead_block(dead_pre.clone(), 20), dead_pre.relu(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_code_gradient_of_sparse_decode_matches_a_gather_in_every_cpu_dtype(dtype) -> None:
    """The CPU code gradient (a sampled product for float32/64, embedding_bag's kernel for
    other dtypes) against gathered rows."""
    gen = torch.Generator().manual_seed(2)
    W_dec = torch.randn(D_SAE, D_IN, generator=gen).to(dtype).requires_grad_()
    values = torch.rand(N, 3, generator=gen).to(dtype).requires_grad_()
    indices = torch.stack([torch.randperm(D_SAE, generator=gen)[:3] for _ in range(N)])
    grad_out = torch.randn(N, D_IN, generator=gen).to(dtype)
    (out,) = sparse_decode([(values, indices)], W_dec)
    (grad_values,) = torch.autograd.grad(out, values, grad_out)
    expected = (W_dec.detach()[indices].float() * grad_out.float()[:, None]).sum(-1)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(grad_values.float(), expected, rtol=tol, atol=tol)


def test_benchmark_train_only_refreshes_the_training_rows_and_keeps_the_rest(tmp_path) -> None:
    from benchmarks import __main__ as bench

    previous = json.loads((REPO / "benchmarks" / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps(previous))
    out = bench.refresh_train_rows(bench.SMOKE, "cpu", tmp_path / "results.md", "python -m benchmarks --train-only")
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["harvest"] == previous["harvest"] and written["analysis"] == previous["analysis"]
    assert written["train"]["R8"]["d_sae"] == 8 * bench.SMOKE.d_in != previous["train"]["R8"]["d_sae"]
    assert written["ratios"] == out["ratios"]
    assert "harvest and analysis from the previous full run" in (tmp_path / "results.md").read_text()


def _auxk_loss_and_grads(sae: MultiLayerTrainingSAE, x: torch.Tensor, dead: torch.Tensor):
    sae.zero_grad()
    out = sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    )
    aux = out.losses["auxiliary_reconstruction_loss"]
    aux.backward()
    return aux.detach(), {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


def test_bf16_auxk_products_stay_within_the_stated_tolerance_of_float32() -> None:
    """--auxk-matmul-dtype bfloat16: the AuxK loss within 1e-3 and each of its gradients within
    1e-2 (relative, Frobenius) of float32 (measured: ~5e-5 and ~2.3e-3)."""
    torch.manual_seed(0)
    d_in = 64
    sae = MultiLayerTrainingSAE(MultiLayerTrainingSAEConfig(d_in=d_in, d_sae=8 * d_in, k=8, n_layers=4))
    x = torch.randn(256, 4, d_in)
    dead = torch.arange(8 * d_in) % 10 == 0
    assert aux_is_dense(int(dead.sum()), sae.cfg.effective_aux_k)  # the dense block the dtype applies to
    loss32, grads32 = _auxk_loss_and_grads(sae, x, dead)
    sae.aux_matmul_dtype = torch.bfloat16
    loss16, grads16 = _auxk_loss_and_grads(sae, x, dead)
    assert loss16.dtype == torch.float32 and float(loss32) > 0
    assert abs(float(loss16 - loss32)) <= 1e-3 * float(loss32)
    assert set(grads16) == set(grads32) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, g in grads32.items():
        assert grads16[name].dtype == torch.float32
        rel = float((grads16[name] - g).norm() / g.norm())
        assert 0 < rel <= 1e-2, (name, rel)  # > 0: the products really ran in bf16


def test_pre_activation_buffer_is_reused_across_steps_and_never_aliases_a_result() -> None:
    torch.manual_seed(0)
    sae = MultiLayerTrainingSAE(MultiLayerTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, n_layers=3))
    dead = torch.arange(D_SAE) % 4 == 0
    x1, x2 = torch.randn(16, 3, D_IN), torch.randn(16, 3, D_IN)

    def step(x):
        return sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        )

    first = step(x1)
    kept = (first.topk.values.clone(), first.topk.indices.clone(), first.loss.detach().clone())
    buffer = sae.pre_activation_buffer.buffer
    assert buffer is not None and buffer.shape == (16 * 3, D_SAE)
    second = step(x2)
    assert sae.pre_activation_buffer.buffer.data_ptr() == buffer.data_ptr()  # reused, not reallocated
    # The first step's results are intact after the buffer was overwritten by the second.
    torch.testing.assert_close(first.topk.values, kept[0], rtol=0, atol=0)
    assert torch.equal(first.topk.indices, kept[1])
    # And the buffer changes nothing: the same step without it gives the same values.
    sae.pre_activation_buffer.get = lambda *args: None  # type: ignore[method-assign]
    again = step(x2)
    torch.testing.assert_close(again.loss, second.loss, rtol=0, atol=0)
    torch.testing.assert_close(again.topk.values, second.topk.values, rtol=0, atol=0)
    sae.pre_activation_buffer.release()
    assert sae.pre_activation_buffer.buffer is None


def test_auxk_matmul_dtype_choices(monkeypatch) -> None:
    from mlsae_lens.training import auxk_matmul_dtype

    assert isinstance(dense_ops.has_native_bf16_matmul(torch.device("cpu")), bool)
    assert auxk_matmul_dtype("float32", "cpu") is None
    assert auxk_matmul_dtype("bfloat16", "cpu") is torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(dense_ops, "has_native_bf16_matmul", lambda device, native=native: native)
        assert auxk_matmul_dtype("auto", "cpu") is (torch.bfloat16 if native else None)
