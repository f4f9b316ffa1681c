"""docs/compare-runs.ipynb executed on a real Jupyter kernel (nbclient + ipykernel) in a scratch
folder, as a reader runs it: the demo through the Python API, its results, plot, claim and the
best model loaded with MLflow's own loader; its outputs checked, not only that it ran."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
import notebooks  # noqa: E402
from tests.servers import sweep_env  # noqa: E402


@pytest.mark.slow
def test_the_compare_runs_notebook_runs_and_its_loaded_model_reaches_the_recorded_accuracy(tmp_path: Path) -> None:
    node = notebooks.execute(notebooks.COMPARE_RUNS, tmp_path, sweep_env(BNEW_PROJECT_DIR=str(tmp_path)))
    printed = notebooks.text_outputs(node)
    assert "complete: True; trained 12, reused 0" in printed, printed
    assert "trials: 12" in printed
    recorded, loaded = map(float, re.search(r"recorded ([\d.]+)%, loaded model ([\d.]+)%", printed).groups())
    assert abs(recorded - loaded) < 0.01 and recorded > 10 + 20  # a trained network: chance is 10% (10 classes)
    assert notebooks.first_png(node).startswith(b"\x89PNG")  # the plot
    claims = next(cell for cell in node.cells if "report.claims_frame" in cell.source)
    assert "BNEW beats STE" in claims.outputs[0]["data"]["text/plain"]
    assert "Traceback" not in printed
