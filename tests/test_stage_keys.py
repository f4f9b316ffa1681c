"""Stage keys are how a sweep finds what MLflow already trained (across sweeps and releases): every
preset's keys, capped and uncapped, and a tuned stage's, must stay byte-identical to
`golden/stage_keys.json`, written by the code before the package was split into layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeps.core.plan import build_plan
from sweeps.core.spec import load_spec, preset_names
from sweeps.core.search import tuned_cells, tuned_stage

GOLDEN = json.loads((Path(__file__).parent / "golden" / "stage_keys.json").read_text())


@pytest.mark.parametrize("label", sorted(GOLDEN))
def test_every_preset_keeps_its_stage_keys(label: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BNEW_DATA_DIR", str(tmp_path))  # data.root is not part of a key: any folder will do
    name, _, caps = label.partition(" ")
    plan = build_plan(load_spec(name), name, *((1, 2) if caps else (None, None)))
    keys = {role.name: stage.key for stage in plan.stages.values() for role in stage.roles}
    for cell in tuned_cells(plan):
        for template in cell.templates:
            stage = tuned_stage(template, {key: 0.1 for key in plan.spec.tuned_params()}, cell.label)
            keys[stage.name] = stage.key
    assert keys == GOLDEN[label]


def test_the_golden_file_covers_every_preset() -> None:
    assert {label.partition(" ")[0] for label in GOLDEN} == set(preset_names())
