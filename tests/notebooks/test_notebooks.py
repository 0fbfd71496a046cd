"""The notebooks in notebooks/: stored clean, and each one runs top to bottom.

Every notebook is executed headless from a fresh kernel (nbclient) running
this interpreter, in a temporary working directory, against the shipped
default model. A cell error fails the test with the cell's traceback.
"""

import json
import os
import sys
import time

import nbclient
import nbformat
import pytest
from builders import REPO_ROOT

NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
EXPECTED = ["01_generate.ipynb", "02_fill_in_the_middle.ipynb", "03_finetune.ipynb", "04_sharding.ipynb"]
MAX_STORED_BYTES = 50_000
# A notebook takes 15-40 s on 2 idle CPU cores; a cell may take up to this long on a loaded one.
CELL_TIMEOUT_S = 300
KERNEL_NAME = "starcoder-jax-test"

from builders import REPO_ROOT


def test_every_notebook_is_listed():
    assert NOTEBOOKS == EXPECTED


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    path = os.path.join(NOTEBOOK_DIR, name)
    size = os.path.getsize(path)
    assert size < MAX_STORED_BYTES, f"{name} is {size} bytes; store notebooks small and without outputs"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{name}: cells {dirty} have outputs or execution counts; clear them before saving"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 3, f"{name} needs prose between its cells"


def test_hub_models_are_shown_not_run():
    """Loading a model by hub id (network, gigabytes) appears only as code inside
    markdown cells, which nbclient never executes; notebook 01 shows StarCoderBase
    and StarCoder2 that way."""
    shown = {}
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
        for cell in nb.cells:
            if '"bigcode/' in cell.source:
                assert cell.cell_type == "markdown", f"{name}: a code cell loads a hub model"
                shown.setdefault(name, []).append(cell.source)
    text = "\n".join(shown.get("01_generate.ipynb", []))
    for hub_id in ("bigcode/starcoderbase-1b", "bigcode/starcoder2-3b"):
        assert f'sj.load_pretrained("{hub_id}"' in text, hub_id


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A kernelspec that runs this interpreter, found first through JUPYTER_PATH.

    The default "python3" spec could resolve to a user-wide install of some
    other Python; this one cannot.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "starcoder-jax tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), previous]))
    yield KERNEL_NAME
    if previous is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = previous


# The quick tier runs the shortest notebook (about 20 s); the full tier every one.
QUICK_NOTEBOOKS = ("02_fill_in_the_middle.ipynb",)


@pytest.mark.parametrize("name", [n if n in QUICK_NOTEBOOKS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NOTEBOOKS])
def test_notebook_runs(name, kernel_name, tmp_path, monkeypatch):
    # The notebooks' model hook is for development only: tests run the shipped default.
    monkeypatch.delenv("STARCODER_JAX_NOTEBOOK_MODEL", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # 04's compiled sweep in its one-mesh, 1B-only form (the full one compiles 24 programs)
    monkeypatch.setenv("STARCODER_JAX_NOTEBOOK_QUICK", "1")
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    repo_before = _repo_listing()
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name}: a cell failed:\n{err}", pytrace=False)
    elapsed = time.perf_counter() - start
    print(f"{name}: {elapsed:.1f} s")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    tables = [out for out in outputs if "text/html" in out.get("data", {})]
    assert figures or tables, f"{name} shows neither a figure nor a table"
    assert _repo_listing() == repo_before, f"{name} wrote into the repository; write to a temp dir"


def _repo_listing():
    """Names at the repository root and in notebooks/, where a careless notebook writes."""
    root = os.path.dirname(NOTEBOOK_DIR)
    return sorted(os.listdir(root)), sorted(os.listdir(NOTEBOOK_DIR))
