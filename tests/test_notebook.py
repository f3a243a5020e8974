"""examples/walkthrough.ipynb runs top to bottom on the tiny model, with its figures inline."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "walkthrough.ipynb"

pytestmark = pytest.mark.slow


def test_walkthrough_notebook_runs_and_shows_its_figures(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o["data"]["application/vnd.plotly.v1+json"] for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    titles = [f["layout"]["title"]["text"] for f in figures]
    assert len(figures) == 3, titles
    assert titles[0].startswith("Pairwise centered cosine") and titles[1].startswith("Layer sweep over 12 personas")
    assert "ρ = " in titles[2] and "n = 12" in titles[2]
    assert (tmp_path / "runs" / "tiny-model" / "config.json").is_file()
    text = "".join(o.get("text", "") for o in outputs)
    assert "Layer sweep: 12 personas x 4 layers" in text
