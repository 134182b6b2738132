"""The notebooks in ``notebooks/`` run top to bottom without errors, so they never rot.

Each is executed with nbclient in the ``python3`` kernel, which jupyter_client starts with this interpreter
(``sys.executable``, the venv's python), from a temporary working directory: the notebooks find their data
through the package and write only into temporary folders. Together they take about a minute on one CPU thread.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))  # every notebook, so a new one is tested too


def test_notebooks_present() -> None:
    assert {"01_quickstart.ipynb", "02_uncertainty_review.ipynb", "03_train_your_own.ipynb"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_stored_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "clear outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # figures must show inline (medsr's figure writers select a file-only backend when imported)
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no inline figure"
    assert list(tmp_path.iterdir()) == [], f"{name} wrote into its working directory"
