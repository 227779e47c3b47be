"""The package's shape (docs/architecture.md): imports flow one way, modules stay small.

Every import counts, lazy ones inside functions included: a lazy import upward is still a
dependency upward. A new module must be placed in ``LAYERS`` (and in docs/architecture.md).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlsae_lens"
MAX_LINES = 500

# Bottom to top. A module may import its own layer and the layers below it, never above.
LAYERS: list[tuple[str, str]] = [
    ("foundations", "errors atomic progress memory cli_defaults"),
    ("model and data", "config sources bridge hooked models data data.documents data.embedded data.hub "
                       "data.local data.packing data.special_tokens data.splits data.tokenization"),
    ("activations", "activations distributed checkpoint activation_cache"),
    ("SAE", "normalization dense_ops sparse_ops sae_files sae_mixin layer_view sae lens releases reference_checkpoint "
            "pretrained"),
    ("training | statistics", "runner_config activations_store trainer training run_dir run_training "
                              "analysis analysis.layer_result analysis.layer_stats analysis.reference_ratios "
                              "analysis.residual analysis.stats_files topk_contexts activation_samples"),
    ("evaluation and analysis passes", "evals eval_downstream baselines eval_methods eval_summary eval_merge "
                                       "analysis_options analysis_prompt analysis_state analysis_stream "
                                       "top_contexts_file run_files"),
    ("report", "figures report report_eval report_analysis run_report report_compare explorer_page explorer "
               "explorer_serve"),
    ("commands", "analyze eval_run pipeline flags cli __main__"),
]


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name or "mlsae_lens"] = path
    return files


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (relative to ``mlsae_lens``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("mlsae_lens."):
                short = name.removeprefix("mlsae_lens.")
                if short in known:
                    found.add(short)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files) - {"mlsae_lens"}
    return {name: imports_of(path, known) - {name} for name, path in files.items() if name != "mlsae_lens"}


def test_every_module_has_a_layer() -> None:
    placed = [name for _, names in LAYERS for name in names.split()]
    assert len(placed) == len(set(placed))
    assert sorted(placed) == sorted(graph()), "place new modules in LAYERS and docs/architecture.md"


def test_no_module_imports_a_layer_above_its_own() -> None:
    level = {name: i for i, (_, names) in enumerate(LAYERS) for name in names.split()}
    upward = [f"{m} ({LAYERS[level[m]][0]}) -> {t} ({LAYERS[level[t]][0]})"
              for m, targets in graph().items() for t in targets if level[t] > level[m]]
    assert not upward


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path, node, target])
            if target not in state:
                visit(target, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_no_module_is_over_500_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
