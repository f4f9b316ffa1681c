"""Claims and model selection in reports: Welch and paired contrasts against hand computations,
verdicts, the paper's effects from tables.json, spec checks, and `report.select`, the data note
and the per-seed files on a real MLflow store (the oracle tests are in test_claims_statistics.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from bnew_core.config import BnewError
from sweeps.analysis.claims import (
    CONTRADICTED,
    HOLDS,
    NOT_SHOWN,
    CellSample,
    Power,
    claim_test,
    paper_effect,
    verdict,
)
from sweeps.analysis.report import write_report
from sweeps.analysis.tables import load_paper_tables
from sweeps.core.spec import load_spec, parse_spec


def cells(*samples: tuple[int, list[float]]) -> list[CellSample]:
    """Cells whose runs have seeds of their own (cell i: seeds `i.0`, `i.1`, ...): no shared seed, Welch."""
    return [CellSample({"cell": str(index)}, sign, np.array(values), tuple(f"{index}.{k}" for k in range(len(values))))
            for index, (sign, values) in enumerate(samples)]


def welch(compared: list[CellSample]) -> tuple[float, float, float, float]:
    """The claim's contrast of `compared` as the claims test it: effect, se, df, p."""
    test = claim_test(compared)
    assert test.test == "welch"
    return test.effect, test.se, test.df, test.p_value


def test_two_cell_contrast_is_welchs_t_test() -> None:
    treated, control = [42.1, 43.0, 41.2, 42.6], [55.0, 55.9, 55.2]
    effect, se, df, p_value = welch(cells((1, treated), (-1, control)))
    assert effect == pytest.approx(np.mean(treated) - np.mean(control))
    assert se == pytest.approx(math.sqrt(np.var(treated, ddof=1) / 4 + np.var(control, ddof=1) / 3))
    assert p_value == pytest.approx(stats.ttest_ind(treated, control, equal_var=False).pvalue)
    assert df == pytest.approx(stats.ttest_ind(treated, control, equal_var=False).df)


def test_difference_in_differences_by_hand() -> None:
    samples = {"bnew_long": [57.5, 57.9, 57.2], "bnew_short": [55.8, 55.1, 55.5],
               "ste_long": [56.8, 56.5, 57.0], "ste_short": [56.1, 56.4, 55.8]}
    effect, se, df, p_value = welch(cells(
        (1, samples["bnew_long"]), (-1, samples["bnew_short"]), (-1, samples["ste_long"]), (1, samples["ste_short"])))
    means = {key: np.mean(values) for key, values in samples.items()}
    variances = {key: np.var(values, ddof=1) / 3 for key, values in samples.items()}
    assert effect == pytest.approx(means["bnew_long"] - means["bnew_short"] - means["ste_long"] + means["ste_short"])
    assert se == pytest.approx(math.sqrt(sum(variances.values())))
    expected_df = sum(variances.values()) ** 2 / sum(v**2 / 2 for v in variances.values())
    assert df == pytest.approx(expected_df)
    assert p_value == pytest.approx(2 * stats.t.sf(abs(effect) / se, expected_df))


def test_verdicts_follow_significance_and_the_papers_sign() -> None:
    lower, higher = [40.0, 41.0, 40.5], [55.0, 55.5, 56.0]
    power = Power(1.0, 3, 2.0, 1.3, "paper", 5)  # MDE 2.0 above the 1.3 of interest
    drop = claim_test(cells((1, lower), (-1, higher)))
    assert verdict(drop, drop.p_value, -13.3, power) == (HOLDS, "p < 0.05, the paper's sign")
    assert verdict(drop, drop.p_value, +2.5, power)[0] == CONTRADICTED
    assert verdict(drop, 0.2, -13.3, power, "Holm over 5 claims") == (
        NOT_SHOWN, "p < 0.05 but adjusted p >= 0.05 (Holm over 5 claims)")
    assert verdict(drop, 0.01, -13.3, power, "Holm over 5 claims") == (
        HOLDS, "adjusted p < 0.05 (Holm over 5 claims), the paper's sign")
    noisy = claim_test(cells((1, [50.0, 58.0, 54.0]), (-1, [53.0, 57.0, 55.5])))
    assert verdict(noisy, noisy.p_value, -1.3, power) == (NOT_SHOWN, (
        "undecided at n=3: its CI holds 0, and 80% power needs an effect of 2.00 or more (the MDE), above the "
        "1.30 of interest (paper); 5 seeds per cell would decide it"))
    powerful = Power(1.0, 3, 1.0, 1.3, "smallest_effect", 2)
    assert verdict(noisy, noisy.p_value, -1.3, powerful) == (NOT_SHOWN, (
        "p >= 0.05, though n=3 had 80% power for effects of 1.00 or more, within the 1.30 of interest (stated)"))
    single = claim_test(cells((1, [50.0]), (-1, higher)))
    assert verdict(single, single.p_value, -1.3, power) == (NOT_SHOWN, "fewer than two runs in a cell")
    flat = claim_test(cells((1, [50.0, 50.0]), (-1, [50.0, 50.0])))
    assert verdict(flat, flat.p_value, -1.3, power) == (NOT_SHOWN, "no spread between seeds to test")


def test_study_preset_takes_the_papers_effects_from_tables_json() -> None:
    spec = load_spec("cifar10-cpu-study")
    effects = [paper_effect(claim, load_paper_tables()) for claim in spec.report.claims]
    # Table 2 (BNEW column): 42.5 - 55.8, 51.8 - 55.8, 54.5 - 55.8; Table 1: 55.8 - 52.7 and
    # (55.0 - 52.7) - (55.0 - 53.6) for BNEW's and STE's gain from 200 to 1000 epochs.
    assert effects == pytest.approx([-13.3, -4.0, -1.3, 3.1, 0.9])


def study_dict() -> dict:
    return yaml.safe_load(Path("sweeps/presets/cifar10-cpu-study.yaml").read_text())


@pytest.mark.parametrize("change, message", [
    (lambda r: r["claims"][1].update(where={"lr": 0.1}), r"report.claims.1: 'lr' is not an axis"),
    (lambda r: r["claims"][0].update(contrast={"ablation": ["no_prelu", "baseline"], "budget": [3, 6]}),
     "report.claims.0.contrast"),
    (lambda r: r["claims"][0]["where"].update(ablation="baseline"), "axis ablation is given twice"),
    (lambda r: r.update(select="best"), "report.select"),
    (lambda r: r.update(correction="bonferroni"), "report.correction"),
    (lambda r: r["claims"][2].update(smallest_effect=-1.0), "report.claims.2.smallest_effect"),
])
def test_spec_names_the_bad_claim_key(change, message: str) -> None:
    data = study_dict()
    change(data["report"])
    with pytest.raises(BnewError, match=message):
        parse_spec(data, "study.yaml")


def test_best_val_without_a_validation_split_is_one_line() -> None:
    data = study_dict()
    data["report"]["select"] = "best_val"
    parse_spec(data, "study.yaml")  # the preset holds out 250 images
    del data["datasets"]["imagefolder"]["val_size"]
    with pytest.raises(BnewError, match=r"report.select: best_val needs a validation split; set data.val_size > 0") as error:
        parse_spec(data, "study.yaml")
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- against MLflow
SWEEP = "claims-mini"
SPEC = {
    "name": SWEEP, "grid": "g",
    "axes": {"dataset": ["synthetic"], "optimiser": ["bnew"], "ablation": ["baseline", "no_prelu"],
             "seed": [0, 1, 2], "budget": [3], "distillation": [False]},
    "base": {"data": {"train_limit": 500, "split_seed": 4}},
    "datasets": {"synthetic": {"val_size": 100}},
    "report": {
        "rows": ["ablation"], "columns": ["optimiser"], "baseline": "baseline", "select": "best_val",
        "claims": [{"name": "relu costs points", "contrast": {"ablation": ["no_prelu", "baseline"]},
                    "where": {"optimiser": "bnew", "distillation": False},
                    "paper_effect": {"table": "table2_ablation", "plus": [["no_prelu", "bnew"]],
                                     "minus": [["baseline", "bnew"]]}}],
    },
}
HISTORIES = {  # (ablation, seed) -> per-epoch (val_acc_binary, test_acc_binary); best val is not the last epoch
    ("baseline", 0): [(50, 51), (62, 60), (61, 63)], ("baseline", 1): [(55, 54), (60, 61), (63, 62)],
    ("baseline", 2): [(58, 57), (64, 62), (63, 64)],
    ("no_prelu", 0): [(40, 41), (45, 44), (44, 47)], ("no_prelu", 1): [(46, 45), (44, 43), (45, 46)],
    ("no_prelu", 2): [(42, 43), (47, 45), (46, 48)],
}


def best_val_test(history: list[tuple[int, int]]) -> int:
    return max(history, key=lambda pair: pair[0])[1]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(SWEEP, artifact_location=(root / SWEEP).as_uri())
    parent_id = client.create_run(experiment_id, run_name=SWEEP, tags={"bnew.role": "sweep"}).info.run_id
    client.log_text(parent_id, yaml.safe_dump(SPEC), "spec.yaml")
    common = {"mlflow.parentRunId": parent_id, "bnew.role": "trial", "bnew.grid": "g", "bnew.dataset": "synthetic",
              "bnew.budget": "3", "bnew.distillation": "no"}
    for (ablation, seed), history in HISTORIES.items():
        tags = {**common, "bnew.stage": "quantise", "bnew.optimiser": "bnew", "bnew.ablation": ablation,
                "bnew.seed": str(seed)}
        run_id = client.create_run(experiment_id, run_name=f"g/bnew/{ablation}/seed{seed}", tags=tags).info.run_id
        metrics = [Metric(key, value, 0, epoch) for epoch, (val, test) in enumerate(history)
                   for key, value in (("val_acc_binary", val), ("test_acc_binary", test))]
        client.log_batch(run_id, metrics=[*metrics, Metric("final_test_acc_binary", history[-1][1], 0, 2)])
        client.set_terminated(run_id)
    for seed, accuracy in enumerate([71.5, 70.25]):
        tags = {**common, "bnew.stage": "teacher", "bnew.optimiser": "teacher", "bnew.ablation": "baseline",
                "bnew.seed": str(seed)}
        run_id = client.create_run(experiment_id, run_name=f"g/teacher/seed{seed}", tags=tags).info.run_id
        client.log_metric(run_id, "final_test_acc_binary", accuracy)
        client.set_terminated(run_id)
    client.set_terminated(parent_id)
    return uri


def test_best_val_reports_the_test_accuracy_at_the_best_validation_epoch(tracking_uri: str, tmp_path: Path) -> None:
    report = write_report(tracking_uri, SWEEP, tmp_path / "best", log_artifacts=False)
    (table,) = report.tables
    for ablation in ("baseline", "no_prelu"):
        expected = [best_val_test(HISTORIES[(ablation, seed)]) for seed in range(3)]
        assert table.cells.loc[(ablation, "bnew")]["mean"] == pytest.approx(np.mean(expected))
    assert "Selection (report.select: best_val): `test_acc_binary` at each run's epoch of best val_acc_binary" in report.text
    (claim,) = report.claims
    treated = [best_val_test(HISTORIES[("no_prelu", seed)]) for seed in range(3)]
    control = [best_val_test(HISTORIES[("baseline", seed)]) for seed in range(3)]
    assert claim.effect == pytest.approx(np.mean(treated) - np.mean(control))
    # every seed trained both cells: paired by seed, one claim so nothing to adjust
    assert claim.p_value == pytest.approx(stats.ttest_rel(treated, control).pvalue)
    assert claim.adjusted_p == pytest.approx(claim.p_value) and claim.test.test == "paired"
    assert (claim.paper_effect, claim.verdict) == (pytest.approx(-1.3), HOLDS)
    assert "| relu costs points |" in report.text and "**holds**" in report.text
    assert "| paired by seed, 3 seeds in every cell |" in report.text
    assert "Holm-adjusted over the 1 claim tested" in report.text
    assert {path.name for path in report.files} >= {"report.md", "claims.csv", "claims_seeds.csv", "claims.png"}
    seeds = pd.read_csv(tmp_path / "best" / "claims_seeds.csv")
    no_prelu = seeds[seeds.cell == "ablation=no_prelu"]
    assert no_prelu.seed.tolist() == [0, 1, 2] and no_prelu.value.tolist() == treated
    assert seeds[seeds.cell == "per-seed contrast"].value.tolist() == pytest.approx(
        [t - c for t, c in zip(treated, control)])
    # the images the p-values are about, from the stored spec's data settings
    assert ("- `synthetic`: training images: 500, a random subset (seed 5) of those left after holding out 100 "
            "for validation (split seed 4); test images: all.") in report.text
    assert "Every p-value and confidence interval below is about these images only" in report.text
    # the teachers' test accuracies, so a distilled cell can be traced to its teacher
    assert "`g/teacher/seed0`" in report.text and "test accuracy 71.50%" in report.text


def test_select_final_from_the_command_line(tracking_uri: str, tmp_path: Path) -> None:
    report = write_report(tracking_uri, SWEEP, tmp_path / "final", log_artifacts=False, select="final")
    (table,) = report.tables
    expected = [HISTORIES[("baseline", seed)][-1][1] for seed in range(3)]
    assert table.cells.loc[("baseline", "bnew")]["mean"] == pytest.approx(np.mean(expected))
    assert "Selection (report.select: final): `test_acc_binary` at the final epoch of each run." in report.text
