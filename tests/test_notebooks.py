"""The example notebooks execute top to bottom (small settings, CPU, no network)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["01_quickstart.ipynb", "02_residual_stream_analysis.ipynb", "03_tuned_lens.ipynb",
     "04_published_pythia_mlsaes.ipynb"],
)
def test_notebook_executes(name, tmp_path, monkeypatch, embedded_model) -> None:  # noqa: ARG001 (warm cache)
    monkeypatch.setenv("MLSAE_NB_TRAINING_TOKENS", "256")
    monkeypatch.setenv("MLSAE_NB_ANALYSIS_TOKENS", "256")
    monkeypatch.setenv("MLSAE_NB_EXPANSION_FACTOR", "1")
    monkeypatch.setenv("MLSAE_NB_LENS_STEPS", "2")
    monkeypatch.setenv("MLSAE_NB_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Pythia notebook must skip cleanly offline
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "strip outputs"
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    if name.startswith("04"):
        assert "skipping:" in text
