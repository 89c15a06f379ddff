"""docs/quickstart.ipynb, the whole roadmap from a notebook: executed in a Jupyter kernel (nbclient) at small sizes,
every cell must run and draw what it shows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"
SMALL = ("N_CTS, CT_SHAPE, VAL_FOLD, EPOCHS, SEG_EPOCHS, EPOCH_SAMPLES, BATCH_SIZE, NUM_WORKERS = "
         "4, (32, 128, 128), 3, 1, 1, 16, 8, 1")
"""The sizes CI runs it at: 4 CTs, an epoch of 2 steps each, fold 3 held out, a data worker started from the
kernel."""
WIDGET = "application/vnd.jupyter.widget-view+json"


def _read() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def _this_python_kernel(folder: Path) -> KernelManager:
    """A kernel run by this interpreter, the one whose environment has luna_dist and the test extra: a kernel
    named `python3` elsewhere (a user's, a system's) could be another Python without them."""
    spec = folder / "kernels" / "luna_dist"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "luna_dist", "language": "python"}))
    return KernelManager(kernel_name="luna_dist",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def test_the_notebook_is_kept_without_outputs():
    cells = [cell for cell in _read().cells if cell.cell_type == "code"]
    assert cells and all(not cell.outputs and cell.execution_count is None for cell in cells)


@pytest.mark.slow
def test_the_quickstart_notebook_runs_in_a_kernel_and_shows_its_pictures_and_progress(tmp_path, monkeypatch):
    """Its parameters cell set small (as papermill would: a cell after the one tagged `parameters`), the notebook
    runs in an IPython kernel from its first cell to its last, in a folder of its own; a failing cell fails
    the test, naming it. Each picture is drawn inline and the library's progress bars are Jupyter widgets."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    notebook = _read()
    tagged = [n for n, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(SMALL))
    run = tmp_path / "run"
    run.mkdir()
    NotebookClient(notebook, km=_this_python_kernel(tmp_path), timeout=300,
                   resources={"metadata": {"path": str(run)}}).execute()

    def outputs(marker: str) -> list[dict]:
        """The outputs of the one code cell whose source holds `marker`."""
        cells = [cell for cell in notebook.cells if cell.cell_type == "code" and marker in cell.source]
        assert len(cells) == 1, marker
        return cells[0].outputs

    for marker in ("ax.imshow(ct.hu[index]", "def scalars(", "froc.png", "plt.imread(results"):
        assert any("image/png" in output.get("data", {}) for output in outputs(marker)), marker
    for marker in ("build_shards(cls_options)", '"--run-name", "cls"', '"--run-name", "seg"'):
        assert any(WIDGET in output.get("data", {}) for output in outputs(marker)), marker
    assert "1 data worker(s) each" in "".join(output.get("text", "") for output in outputs('"--run-name", "cls"'))
    work = run / "quickstart"
    assert (work / "runs" / "cls" / "best.pt").is_file() and (work / "runs" / "seg" / "best.pt").is_file()
    assert (work / "results" / "report.html").is_file()
