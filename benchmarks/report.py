"""``results.md``: the ratios against their goals, the machine, versions and the command."""

from pathlib import Path

from benchmarks.train import SPARSIFY_INSTALL
from mlsae_lens.atomic import atomic_write_text

GOALS = {
    "train_vs_saelens": ("MLSAE train step vs SAELens TopKTrainingSAE (speed-up, higher is better)", ">= 4", lambda r: r >= 4),
    "train_vs_floor": ("MLSAE train step / floor (encoder matmul + top-k)", "<= 1.5", lambda r: r <= 1.5),
    "train_vs_sparsify": ("MLSAE train step vs EleutherAI sparsify (speed-up, higher is better)", ">= 1", lambda r: r >= 1),
    "harvest_vs_forward": ("all-layer harvest / forward through the blocks", "<= 1.1", lambda r: r <= 1.1),
    "analysis_vs_encode": ("encode + LayerDistributionStats.update_sparse / encode", "<= 1.2", lambda r: r <= 1.2),
    "analysis_memory_ratio": ("peak memory growth of the accumulation, 1M / 10k tokens", "0.9 - 1.1", lambda r: 0.9 <= r <= 1.1),
}


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_results(path: Path, results: dict, ratios: dict[str, float], machine: dict[str, str], plots: list[str], command: str) -> None:
    s = results["sizes"]
    lines = [
        "# mlsae-lens benchmarks",
        "",
        f"Command: `{command}`. Every ratio compares two measurements interleaved in the same process "
        "(median of repeats); absolute times are context only. The machine is shared with other jobs, so "
        "expect a few tens of percent of noise between runs.",
        "",
        "## Machine and versions",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        "## Ratios against the goals",
        "",
        f"Main comparisons ({results.get('device', 'cpu')}): d_in {s['d_in']}, k {s['k']}, {s['vectors']} vectors, float32 "
        "parameters (on CUDA the encoder matmul in bfloat16, as the runner does there, and SAELens under bf16 autocast), "
        f"d_sae = R·d_in; the first R ({s['ratios'][0]}) is the headline row. Adam is `fused=True` for both SAEs. "
        "The floor writes its pre-activations into one reused buffer, as the MLSAE step does (a fresh output "
        "per call adds its page faults, ~12 % of the floor on CPU). "
        "10 % of latents are marked dead so both SAEs run AuxK (aux_k = d_in // 2 = 288 here). With up to 4 dead "
        "latents per selected one (CPU; R = 8 has 1.6) the AuxK code is a dense block over the dead latents and "
        "costs four GEMMs of n_dead columns (the forward; the code's, the decoder's and the encoder's "
        "gradients); with more it takes the "
        "sparse path. The MLSAE step runs them as training does, `--auxk-matmul-dtype auto`: bfloat16 where bf16 "
        "GEMMs are native (see the machine above; the AuxK loss and gradients stay within 1e-3 and 1e-2 of "
        "float32, `tests/test_sparse_ops.py`), float32 elsewhere; the table also gives the step with float32 "
        "AuxK products, at 1 % dead (what our runs end with) and with no dead latents. EleutherAI's sparsify (its `SparseCoder` step as its trainer "
        "runs it, with Adam; on CPU its eager `embedding_bag` decoder, on CUDA its Triton one when Triton is "
        "installed) is timed interleaved with an MLSAE step of its own group; its AuxK trains only the decoder, ours "
        f"also the encoder. It is not a project dependency: `{SPARSIFY_INSTALL}`.",
        "",
        "| metric | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for key, (label, goal, ok) in GOALS.items():
        if ratios.get(key) is None:
            lines.append(f"| {label} | skipped: not installed (`{SPARSIFY_INSTALL}`) | {goal} | - |")
            continue
        lines.append(f"| {label} | {ratios[key]:.2f} | {goal} | {'yes' if ok(ratios[key]) else 'no'} |")
    lines += ["", "## Training step", "",
              "| R | d_sae | MLSAE step (s) | SAELens step (s) | floor (s) | MLSAE vectors/s | SAELens vectors/s | MLSAE / floor | SAELens / floor | speed-up vs SAELens | MLSAE / floor, float32 AuxK | MLSAE / floor, 1 % dead | MLSAE / floor, no dead latents (no AuxK) | MLSAE / floor with default (unfused) Adam | sparsify step (s) | speed-up vs sparsify |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["train"].items():
        lines.append(
            f"| {name[1:]} | {row['d_sae']} | {row['mlsae_s']:.3f} | {row['saelens_s']:.3f} | {row['floor_s']:.3f} | "
            f"{row['mlsae_vectors_per_s']:.0f} | {row['saelens_vectors_per_s']:.0f} | {row['train_vs_floor']:.2f} | "
            f"{row['saelens_vs_floor']:.2f} | {row['train_vs_saelens']:.2f} | "
            f"{row.get('train_vs_floor_float32_auxk', float('nan')):.2f} | {row.get('train_vs_floor_1pct_dead', float('nan')):.2f} | "
            f"{row['train_vs_floor_no_dead']:.2f} | "
            f"{row['train_vs_floor_default_adam']:.2f} | {_maybe(row.get('sparsify_s'), '.3f')} | "
            f"{_maybe(row.get('train_vs_sparsify'), '.2f')} |"
        )
    h = results["harvest"]
    a = results["analysis"]
    lines += [
        "",
        "## Harvest",
        "",
        f"Model: {h['model']}; {h['tokens']} tokens per call. Harvest {h['harvest_s']:.3f} s, forward through the "
        f"blocks (`stop_at_layer=n_layers`, the same compute) {h['forward_blocks_s']:.3f} s, full forward with logits "
        f"{h['forward_logits_s']:.3f} s: harvest / blocks = {h['harvest_vs_forward']:.3f}, harvest / full forward = "
        f"{h['harvest_vs_forward_with_logits']:.3f}.",
        "",
        *[f"- {backend}: harvest {r['harvest_s']:.3f} s, blocks {r['forward_blocks_s']:.3f} s, full forward "
          f"{r['forward_logits_s']:.3f} s: harvest / blocks = {r['harvest_vs_forward']:.3f}"
          for backend, r in h.get("by_backend", {}).items()],
        "",
        "## Analysis",
        "",
        f"{a['tokens']} tokens × {s['analysis_layers']} layers = {a['vectors']} vectors, d_sae {8 * s['d_in']}: encode "
        f"{a['encode_s']:.3f} s, encode + update_sparse {a['encode_and_update_s']:.3f} s (ratio {a['analysis_vs_encode']:.3f}).",
        "",
        f"Memory: synthetic top-k codes ({a['memory_setup']}) for {a['memory_tokens'][0]:,} and {a['memory_tokens'][1]:,} tokens: "
        f"peak RSS growth {a['memory_growth_bytes'][0] / 2**20:.1f} MiB and {a['memory_growth_bytes'][1] / 2**20:.1f} MiB "
        f"(ratio {a['analysis_memory_ratio']:.3f}).",
    ]
    if "scaling" in results:
        lines += ["", "## Scaling (MLSAE step against the floor)", "", "| R | d_sae | k | step (s) | floor (s) | step / floor |", "|---|---|---|---|---|---|"]
        for row in results["scaling"]["d_sae"] + results["scaling"]["k"]:
            lines.append(f"| {row['R']} | {row['d_sae']} | {row['k']} | {row['step_s']:.3f} | {row['floor_s']:.3f} | {row['step_s'] / row['floor_s']:.2f} |")
        lines += ["", "Plot: " + ", ".join(f"[{p}]({p})" for p in plots) + "."]
    atomic_write_text(path, "\n".join(lines) + "\n")
