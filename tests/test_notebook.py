"""demo.ipynb: runs in a real Jupyter kernel, shows its pictures and a model that works, matches its generator."""
import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "demo.ipynb"
MIN_PICTURES = 4  # samples, augmentations, confusion matrix, prediction
# The full synthetic config reaches about 72% validation mIoU; a model that collapses to a few classes (as a
# 3-epoch smoke run does: 8.6% on CamVid, most pixels "building") stays far below this.
MIN_MIOU = 60.0


def pictures(nb) -> list:
    """The PNG images the notebook displays."""
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.output_type == "display_data" and "image/png" in out.get("data", {})]


def errors(nb) -> list[str]:
    """'ename: evalue' of every cell output that is an error."""
    return [f"{out.ename}: {out.evalue}" for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.output_type == "error"]


def reported_miou(nb) -> list[float]:
    """The validation mIoU (%) the notebook prints after evaluating its trained model."""
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.output_type == "stream")
    return [float(m) for m in re.findall(r"validation mIoU of \S+: ([0-9.]+)%", text)]


def test_committed_notebook_carries_its_pictures_and_a_model_that_works():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not errors(nb)
    assert len(pictures(nb)) >= MIN_PICTURES, "commit demo.ipynb executed: python tools/make_demo_notebook.py"
    miou = reported_miou(nb)
    assert len(miou) == 1 and miou[0] >= MIN_MIOU, f"the committed notebook's model scores {miou}"


def test_notebook_cells_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_demo_notebook", REPO / "tools" / "make_demo_notebook.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    committed = [(c.cell_type, c.source) for c in nbformat.read(NOTEBOOK, as_version=4).cells]
    assert committed == [(c.cell_type, c.source) for c in generator.build().cells], \
        "demo.ipynb was edited by hand or is stale: edit tools/make_demo_notebook.py and rerun it"


def test_notebook_executes_in_a_kernel_and_its_model_works(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # Per cell: training takes a few minutes on 2 quiet cores; the margin is for a loaded machine.
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    try:
        client.execute()
    finally:  # the executed copy, for reading when something fails; the committed file is never touched
        nbformat.write(nb, tmp_path / "demo.ipynb")
    assert not errors(nb)
    assert len(pictures(nb)) >= MIN_PICTURES
    miou = reported_miou(nb)
    assert len(miou) == 1 and miou[0] >= MIN_MIOU, f"the notebook's model scores {miou}"
