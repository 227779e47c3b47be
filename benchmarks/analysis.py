"""Analysis accumulation: throughput next to SAE encoding, and memory that stays flat in tokens."""

import json
import resource
import subprocess
import sys
from collections.abc import Callable

import torch

from mlsae_lens.analysis import LayerDistributionStats
from mlsae_lens.sae import MultiLayerSAE, MultiLayerSAEConfig


def analysis_pair(d_in: int, d_sae: int, k: int, n_layers: int, tokens: int,
                  device: str = "cpu") -> dict[str, Callable[[], object]]:
    """``encode_topk`` alone vs ``encode_topk`` + ``LayerDistributionStats.update_sparse``."""
    sae = MultiLayerSAE(MultiLayerSAEConfig(d_in=d_in, d_sae=d_sae, k=k, n_layers=n_layers, device=device)).eval()
    acts = torch.randn(tokens, n_layers, d_in, device=device)

    @torch.inference_mode()
    def encode() -> object:
        return sae.encode_topk(acts)

    @torch.inference_mode()
    def encode_and_update() -> object:
        code = sae.encode_topk(acts)
        LayerDistributionStats(n_layers, d_sae, device=device).update_sparse(code.indices, code.values)
        return code

    return {"encode": encode, "encode_and_update": encode_and_update}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _high_water_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def synthetic_codes(tokens: int, n_layers: int, d_sae: int, k: int, batch: int, device: str = "cpu"):
    """Seeded top-k codes ``(indices, values)`` of ``tokens`` tokens, ``batch`` tokens at a time,
    made on ``device`` (as ``analyze`` gets them from the SAE); ~20 % of the values are 0."""
    gen = torch.Generator(device=device).manual_seed(0)
    for start in range(0, tokens, batch):
        shape = (min(batch, tokens - start), n_layers, k)
        indices = torch.randint(0, d_sae, shape, generator=gen, device=device)
        values = torch.rand(shape, generator=gen, device=device) * (torch.rand(shape, generator=gen, device=device) > 0.2)
        yield indices, values


def accumulate_synthetic(tokens: int, n_layers: int, d_sae: int, k: int, batch: int, use_maxrss: bool = True) -> dict[str, int]:
    """Stream ``tokens`` synthetic top-k codes through one accumulator; peak RSS growth in bytes.

    RSS is sampled after every batch; with ``use_maxrss`` (meant for a fresh process) the
    kernel's high-water mark is used too, which also sees peaks inside ``update_sparse``.
    """
    stats = LayerDistributionStats(n_layers, d_sae)
    before = _rss_bytes()
    peak = before
    for indices, values in synthetic_codes(tokens, n_layers, d_sae, k, batch):
        stats.update_sparse(indices, values)
        peak = max(peak, _rss_bytes())
    # The kernel's high-water mark also sees transient peaks inside update_sparse that sampling
    # misses (VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak).
    if use_maxrss:
        peak = max(peak, _high_water_bytes())
    return {"tokens": stats.n_tokens, "peak_growth_bytes": peak - before}


def accumulate_synthetic_cuda(tokens: int, n_layers: int, d_sae: int, k: int, batch: int) -> dict[str, int]:
    """As :func:`accumulate_synthetic` on the GPU: peak CUDA memory allocated beyond what was
    allocated before (each batch of codes is made on the device, as ``analyze`` gets them)."""
    stats = LayerDistributionStats(n_layers, d_sae, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for indices, values in synthetic_codes(tokens, n_layers, d_sae, k, batch, device="cuda"):
        stats.update_sparse(indices, values)
    torch.cuda.synchronize()
    return {"tokens": stats.n_tokens, "peak_growth_bytes": torch.cuda.max_memory_allocated() - before}


def memory_growth(tokens: int, n_layers: int, d_sae: int, k: int, batch: int) -> int:
    """Peak RSS growth of :func:`accumulate_synthetic` in a fresh process (so runs don't share a heap)."""
    code = (
        "import json, sys; from benchmarks.analysis import accumulate_synthetic; "
        f"print(json.dumps(accumulate_synthetic({tokens}, {n_layers}, {d_sae}, {k}, {batch})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == tokens
    return int(result["peak_growth_bytes"])
