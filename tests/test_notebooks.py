"""The notebooks in demos/ run top to bottom on CPU with the embedded model, in this
environment's Python, and are committed without outputs."""

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "demos").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_the_demos_are_there():
    names = [path.name for path in NOTEBOOKS]
    assert names[:4] == ["01_quickstart.ipynb", "02_attention_store.ipynb",
                         "03_dist_attention.ipynb", "04_serving.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown", "start by saying what runtime it wants"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"cell {index} of {path.name} has outputs: clear them before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_on_cpu(path):
    notebook = nbformat.read(path, as_version=4)
    # First, check that the kernel is this environment's Python (where jattn is installed).
    notebook.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.executable"))
    # As on a fresh CPU runtime: the CPU backend, and none of the test set-up's simulated
    # devices (a notebook that wants them asks for them itself).
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}})
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, naming the cell, on any error
    print(f"{path.name} ran in {time.perf_counter() - start:.0f} s")
