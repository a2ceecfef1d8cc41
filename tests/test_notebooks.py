"""Every notebook in notebooks/ runs top to bottom without an error (small sizes: MLODSL_SMALL=1), is stored
without outputs, and agrees with its source, the paired percent-format .py (notebooks/jupytext.toml)."""
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

HERE = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MLODSL_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)     # the kernel's inline backend, as in Jupyter
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()            # raises CellExecutionError naming the cell that failed
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    for cell in nb.cells:      # a cell that makes a figure shows it
        if cell.cell_type == "code" and "plt.subplots" in cell.source:
            assert any("image/png" in out.get("data", {}) for out in cell.outputs), cell.source[:200]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")


def test_every_notebook_has_its_py_source():
    assert [p.stem for p in NOTEBOOKS] == [p.stem for p in sorted(HERE.glob("*.py"))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_in_sync_with_its_py_source(path):
    jupytext = pytest.importorskip("jupytext")
    cells = lambda nb: [(c.cell_type, c.source) for c in nb.cells]
    assert cells(jupytext.read(path)) == cells(jupytext.read(path.with_suffix(".py"))), \
        f"{path.name} differs from {path.stem}.py: edit the .py, then run `jupytext --sync notebooks/*.py`"
