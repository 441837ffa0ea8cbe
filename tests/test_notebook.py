"""The learner's notebook runs top to bottom (reduced: CATDOGCNN_NOTEBOOK_QUICK=1) and is stored without outputs."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def notebook(repo_root):
    return repo_root / "notebooks" / "cats_vs_dogs.ipynb"


def test_notebook_is_stored_without_outputs(notebook):
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch, notebook):
    nbclient = pytest.importorskip("nbclient", reason="nbclient executes the notebook")
    import nbformat

    monkeypatch.setenv("CATDOGCNN_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(notebook.parent)}})
    client.execute(env={**os.environ})
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "seed CNN: accuracy" in text and "shipped model" in text and "'label':" in text
