"""demo.ipynb: runs top to bottom in a real Jupyter kernel, shows its pictures, and matches its generator."""
import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "demo.ipynb"
MIN_PICTURES = 4  # samples, augmentations, confusion matrix, prediction


def pictures(nb) -> list:
    """The PNG images the notebook displays."""
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.output_type == "display_data" and "image/png" in out.get("data", {})]


def errors(nb) -> list[str]:
    """'ename: evalue' of every cell output that is an error."""
    return [f"{out.ename}: {out.evalue}" for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.output_type == "error"]


def test_committed_notebook_carries_its_pictures():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not errors(nb)
    assert len(pictures(nb)) >= MIN_PICTURES, "commit demo.ipynb executed: python tools/make_demo_notebook.py"


def test_notebook_cells_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_demo_notebook", REPO / "tools" / "make_demo_notebook.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    committed = [(c.cell_type, c.source) for c in nbformat.read(NOTEBOOK, as_version=4).cells]
    assert committed == [(c.cell_type, c.source) for c in generator.build().cells], \
        "demo.ipynb was edited by hand or is stale: edit tools/make_demo_notebook.py and rerun it"


def test_notebook_executes_in_a_kernel_and_shows_pictures(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    try:
        client.execute()
    finally:  # the executed copy, for reading when something fails; the committed file is never touched
        nbformat.write(nb, tmp_path / "demo.ipynb")
    assert not errors(nb)
    assert len(pictures(nb)) >= MIN_PICTURES
