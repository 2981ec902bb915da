"""notebooks/quickstart.ipynb executed end to end in a Jupyter kernel (nbclient) on the CPU, as
CI runs it: the notebook's own `default` preset with a few steps of each stage
(BUNDLEFLOW_NOTEBOOK_STEPS), BUNDLEFLOW_HOME and the cache in a temporary directory; 25-35 s
on a busy 2-core machine. Skipped when nbclient, nbformat or ipykernel is not installed (the
`notebook` extra; scripts/setup.sh installs it)."""

from __future__ import annotations

import base64
import json
import re

import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
STEPS = 10
"""Steps of each stage (BUNDLEFLOW_NOTEBOOK_STEPS)."""
QUERY_ROWS = 8
"""Rows of the menu query the notebook shows (its QUERY_ROWS)."""
CELL_TIMEOUT = 300
"""Seconds a cell may take before the test fails (the training cell takes ~15 s)."""


def _need(module: str):
    return pytest.importorskip(
        module, reason=f"{module} not installed: pip install -e '.[notebook]' (scripts/setup.sh)"
    )


def _cell(nb, tag: str):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def _markdown(cell) -> str:
    return "\n".join(
        out["data"]["text/markdown"]
        for out in cell.outputs
        if out.output_type == "display_data" and "text/markdown" in out["data"]
    )


def test_committed_notebook_has_no_outputs():
    nbformat = _need("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run in a fresh directory (its working directory, BUNDLEFLOW_HOME and
    cache); yields (the executed notebook, the run directory)."""
    nbformat = _need("nbformat")
    nbclient = _need("nbclient")
    _need("ipykernel")
    root = tmp_path_factory.mktemp("bf-notebook")
    env = {
        "BUNDLEFLOW_HOME": str(root / "home"),
        "BUNDLEFLOW_CACHE": str(root / "cache"),
        "BUNDLEFLOW_NOTEBOOK_STEPS": str(STEPS),
        "OMP_NUM_THREADS": "1",  # a short run on a busy 2-core machine
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        for key, value in env.items():
            mp.setenv(key, value)
        client = nbclient.NotebookClient(
            nb,
            timeout=CELL_TIMEOUT,
            kernel_name="python3",
            resources={"metadata": {"path": str(root)}},
        )
        client.execute()  # raises CellExecutionError, with the cell's traceback, on a failure
    (run,) = (root / "home" / "runs").iterdir()  # under BUNDLEFLOW_HOME, not ./runs
    yield nb, run


def test_notebook_trains_the_default_preset_and_shows_the_report(executed):
    nb, run = executed
    report = json.loads((run / "report.json").read_text())  # the run finished
    assert report["menu_size"] == 1000  # `default`'s menu
    launch = json.loads((run / "run.json").read_text())["launch"]
    assert (launch["preset"], launch["max_steps"]) == ("default", STEPS)
    assert "| mechanism | test revenue |" in _markdown(_cell(nb, "report"))
    images = [out for out in _cell(nb, "plots").outputs if "image/png" in out.get("data", {})]
    for out, name in zip(images, ("revenue.png", "menu.png"), strict=True):  # both, inline
        assert base64.b64decode(out["data"]["image/png"]) == (run / name).read_bytes()


def test_notebook_queries_the_menu(executed):
    nb, run = executed
    first, _ = json.loads((run / "run.json").read_text())["data"]["split"]["ranges"]["test"]
    table = _markdown(_cell(nb, "query"))
    cells = [line.split("|") for line in table.splitlines()]
    indices = [int(c[1]) for c in cells if len(c) > 2 and c[1].strip().isdigit()]
    assert indices == list(range(first, first + QUERY_ROWS))  # the first test valuations
    assert re.search(r"\| posted \w+ prices \|", table)  # `default` offers a fallback
    (shown,) = _cell(nb, "python").outputs  # FrozenMechanism.play's (choice, payment)
    assert shown["data"]["text/plain"].startswith("(tensor(")
