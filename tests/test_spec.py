"""Sweep specs: presets load, and malformed specs exit 2 naming the key before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bnew_core.config import BnewError
from sweeps.cli import app
from sweeps.core.plan import build_plan
from sweeps.core.spec import load_spec, parse_spec, preset_names

GOOD_SPEC = {
    "name": "tiny",
    "axes": {"dataset": ["synthetic"], "optimiser": ["ste", "bnew"], "seed": [0], "budget": [3]},
    "optimisers": {"bnew": {"freeze_epochs": 1}},
}


def with_changes(**changes) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(GOOD_SPEC))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


def test_presets_load_and_plan() -> None:
    assert {"demo", "paper-table1", "paper-table2", "paper-main"} <= set(preset_names())
    for name in preset_names():
        spec = load_spec(name)
        assert build_plan(spec, name).stages
        assert spec.report is not None


def test_search_space_axis_is_sampled_reproducibly() -> None:
    spec = parse_spec(with_changes(axes__params={"lr": {"loguniform": [0.001, 0.1], "samples": 3}}), "s")
    values = spec.crossed_params()["lr"]
    assert len(set(values)) == 3 and all(0.001 <= value <= 0.1 for value in values)
    assert parse_spec(with_changes(axes__params={"lr": {"loguniform": [0.001, 0.1], "samples": 3}}), "s").crossed_params()["lr"] == values


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"axes__sead": [0]}, "axes.sead: Extra inputs are not permitted"),
        ({"resources__gpus": 1}, "resources.gpus: Extra inputs are not permitted"),
        ({"base__modle": {"scale": False}}, "base.modle: not a trainer setting"),
        ({"base__model": {"scael": False}}, "base.model.scael: not a trainer setting"),
        ({"base__seed": 3}, "base.seed: set by axes.seed"),
        ({"base__optimiser": {"lambda_rate": 1.0}}, "base.optimiser.lambda_rate: optimiser settings go under optimisers"),
        ({"optimisers__bnew": {"gamma": 0.1}}, "optimisers.bnew.gamma: not a setting of bnew"),
        ({"axes__params": {"optimiser.lambda_rat": [1, 2]}}, "params.optimiser.lambda_rat: not a trainer setting"),
        ({"axes__seed": ["one"]}, "axes.seed.0: Input should be a valid integer"),
        ({"resources__cpu": "lots"}, "resources.cpu: Input should be a valid number"),
        ({"axes__optimiser": []}, "axes.optimiser: List should have at least 1 item"),
        ({"axes__params": {"lr": []}}, "params.lr: empty axis"),
        ({"axes__ablation": ["no_spine"]}, "axes.ablation.0: Input should be 'baseline'"),
        ({"axes__ablation": ["regulariser_l1"]}, "axes.ablation: regulariser_l1 applies to bnew only, not ste"),
        ({"axes__optimiser": ["real"], "axes__ablation": ["no_prelu"]}, "axes.ablation: no_prelu does not apply to the real-valued"),
        ({"optimisers__bnew": {"freeze_epochs": 5}}, "optimiser.freeze_epochs: 5 frozen epochs leave none of the 3"),
        ({"report": {"rows": ["colour"]}}, "report: 'colour' is not an axis"),
        ({"name": "a b"}, "name: Value error, 'a b': use letters"),
    ],
)
def test_malformed_spec_exits_2_naming_the_key(tmp_path: Path, monkeypatch, changes: dict, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(with_changes(**changes)))
    for command in (["sweep", "plan", str(spec_path)], ["sweep", "run", str(spec_path), "--local"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert expected.removeprefix("name: Value error, ") in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / ".bnew").exists(), "nothing may run (no MLflow store, no Tune storage) for a bad spec"


def test_unknown_spec_names_the_presets() -> None:
    with pytest.raises(BnewError, match="no such spec file or preset.*demo"):
        load_spec("no-such-sweep")
