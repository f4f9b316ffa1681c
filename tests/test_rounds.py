"""Seed rounds (`axes.seed: {start, step, max}`): the spec's checks, which cells a round gives
seeds to, the rules that close a claim, the whole procedure's false-positive rate under the null
(simulated through the same rules), and on digits through a real local Ray and MLflow store, with
the accuracies the claims read set by the test (so the same on every CPU): seeds go only to the
undecided claim's cells, the sweep stops once every claim is decided, `resume` continues a round a
failure stopped, replaying the earlier ones, and the report gives the rounds and the boundaries."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from scipy import stats

from bnew_core.callbacks import Callback, TrialResult
from bnew_core.config import BnewError, TrialConfig
from sweeps.analysis.claims import MAX_SEEDS, POWER
from sweeps.analysis.rounds import (
    NO_EFFECT,
    OUT_OF_REACH,
    SHOWN,
    UNDECIDED,
    ClaimLook,
    Round,
    claim_state,
    judge_round,
    recorded_rounds,
    round_design,
)
from sweeps.analysis.status import sweep_status
from sweeps.analysis.statistics import SIGNIFICANCE_LEVEL, minimum_detectable_effect, seeds_needed
from sweeps.analysis.tables import load_paper_tables
from sweeps.core.rounds import claim_covers, round_points
from sweeps.core.spec import PRESET_DIR, SeedRounds, SweepSpec, load_spec, parse_spec
from sweeps.run.trial import METRICS_ENV, forced_metrics, train_forcing_metrics
from tests.servers import sweep_env

STUDY = "cifar10-cpu-study"


def study_with_rounds(rounds: object) -> SweepSpec:
    return load_spec(STUDY, {"axes.seed": rounds})


@pytest.mark.parametrize("rounds, message", [
    ({"start": 3, "max": 2}, "axes.seed.rounds: max (2) is below start (3)"),
    ({"start": 1}, "axes.seed.rounds.start: Input should be greater than or equal to 2"),
    ({"start": 3, "stp": 2}, "axes.seed.rounds.stp: Extra inputs are not permitted"),
    ([0, "a"], 'axes.seed.1: Input should be a valid integer, got "a"'),
    ("3", 'axes.seed: Input should be a valid list, got "3"'),
    ([], "axes.seed: List should have at least 1 item"),
])
def test_bad_rounds_name_the_field(rounds: object, message: str) -> None:
    with pytest.raises(BnewError, match=message.replace("(", r"\(").replace(")", r"\)")):
        study_with_rounds(rounds)


def test_rounds_need_claims_that_leave_the_seed_free() -> None:
    with pytest.raises(BnewError, match="axes.seed: seed rounds add seeds until report.claims are decided"):
        load_spec("demo", {"axes.seed": {"start": 3}})
    data = yaml.safe_load((PRESET_DIR / f"{STUDY}.yaml").read_text())
    data["axes"]["seed"] = {"start": 3}
    data["report"]["claims"][0]["where"]["seed"] = 0
    with pytest.raises(BnewError, match="report.claims.0: 'seed' is the axis the rounds add to"):
        parse_spec(data, "study.yaml")


def test_looks_and_seeds() -> None:
    rounds = SeedRounds(start=3, step=3, max=12, first=5)
    assert rounds.looks() == [3, 6, 9, 12] and rounds.seeds(3) == [5, 6, 7]
    assert SeedRounds(start=3, step=2, max=8).looks() == [3, 5, 7, 8]


def test_round_points_give_seeds_only_to_the_cells_of_undecided_claims() -> None:
    spec = study_with_rounds({"start": 3, "step": 2, "max": 7})
    claims = {claim.name[:3]: claim for claim in spec.report.claims}
    first = round_points(spec, {})
    assert len(first) == 24 and {point["seed"] for point in first} == {0, 1, 2}

    # (d) undecided: its two cells (distilled and not, BNEW baseline at 2 epochs) get seeds 3 and 4
    second = round_points(spec, {claims["(d)"].name: 5})
    added = [point for point in second if point["seed"] >= 3]
    assert len(second) == 24 + 4 and all(claim_covers(claims["(d)"], point) for point in added)
    assert {(point["distillation"], point["seed"]) for point in added} == {(False, 3), (False, 4), (True, 3), (True, 4)}
    assert all(point["ablation"] == "baseline" and point["budget"] == 2 for point in added)

    # a cell two claims share runs the seeds of the one that reached further; (e) crosses 4 cells
    third = round_points(spec, {claims["(d)"].name: 5, claims["(e)"].name: 7})
    cells = {(p["optimiser"], p["budget"], p["distillation"]): max(q["seed"] for q in third if
             (q["optimiser"], q["budget"], q["distillation"], q["ablation"]) ==
             (p["optimiser"], p["budget"], p["distillation"], p["ablation"])) + 1 for p in third
             if p["ablation"] == "baseline"}
    assert cells == {("bnew", 2, False): 7, ("bnew", 6, False): 7, ("ste", 2, False): 7, ("ste", 6, False): 7,
                     ("bnew", 2, True): 5}
    assert max(p["seed"] for p in third if p["ablation"] != "baseline") == 2


def test_claim_states() -> None:
    rounds = SeedRounds(start=3, step=2, max=7)
    design = round_design(tuple(rounds.looks()), SIGNIFICANCE_LEVEL, "pocock", "paired")
    below, above = design.nominal_alpha(0) / 2, design.nominal_alpha(0) * 2
    assert claim_state(below, 9.0, 2.0, 20, 0, rounds, design) == SHOWN
    assert claim_state(above, 1.5, 2.0, 5, 0, rounds, design) == NO_EFFECT  # powered for 2, not shown
    assert claim_state(above, 9.0, 2.0, 5, 0, rounds, design) == UNDECIDED  # 5 seeds would do: add them
    assert claim_state(above, 9.0, 2.0, 8, 0, rounds, design) == OUT_OF_REACH  # past max
    assert claim_state(above, 9.0, 2.0, None, 0, rounds, design) == OUT_OF_REACH
    seeding_all = SeedRounds(start=3, step=2, max=7, skip_out_of_reach=False)
    assert claim_state(above, 9.0, 2.0, 8, 0, seeding_all, design) == UNDECIDED
    assert claim_state(above, 1.5, 2.0, 8, 0, seeding_all, design) == NO_EFFECT
    assert claim_state(above, 9.0, 2.0, 8, 2, rounds, design) == UNDECIDED  # the last round: it stays so
    assert claim_state(math.nan, math.nan, 2.0, None, 1, rounds, design) == OUT_OF_REACH


def test_round_tags_round_trip_and_read_in_order() -> None:
    looks = (ClaimLook("(a) x", 5, 0.01, 0.004, 3.2, 4.0, 6, UNDECIDED), ClaimLook("(b) y", 3, 0.5, 0.001, 1.0, 4.0, 3,
                                                                                  NO_EFFECT))
    tags = dict([Round(2, looks).tag(), Round(1, looks).tag(), ("bnew.other", "1")])
    assert [played.number for played in recorded_rounds(tags)] == [1, 2]
    assert recorded_rounds(tags)[1] == Round(2, looks) and Round(2, looks).undecided == ["(a) x"]
    assert "(a) undecided at 5 seeds (p=0.01, boundary 0.004)" in Round(2, looks).line()


# --- the procedure under the null --------------------------------------------------------------

ROUNDS = SeedRounds(start=3, step=2, max=9)
PATHS = 3_000
LIMIT = SIGNIFICANCE_LEVEL + 3 * math.sqrt(SIGNIFICANCE_LEVEL * (1 - SIGNIFICANCE_LEVEL) / PATHS)
TARGET = 1.4
"""The effect of interest, in sds of the per-seed contrast: at 3 seeds most null claims are undecided
and within reach of 9 seeds (needing 6 to 8), some out of reach; later rounds close some as powered."""


def procedure_rejection_rate(thresholds: list[float], rng: np.random.Generator) -> tuple[float, dict[str, int]]:
    """Null claims (per-seed contrasts ~ N(0, 1)) through the rounds: each round's paired t-test,
    the MDE and seeds needed as the report computes them, `claim_state` with `thresholds` as the
    boundaries; the share of claims ever `shown`, and how the claims ended."""
    design = round_design(tuple(ROUNDS.looks()), SIGNIFICANCE_LEVEL, "obrien_fleming", "paired")
    design = type(design)(design.looks, test="z")  # a fresh object whose thresholds the test may set
    design.nominal_alphas = thresholds
    ended: dict[str, int] = {}
    shown = 0
    for contrasts in rng.standard_normal((PATHS, ROUNDS.max)):
        for index, n in enumerate(ROUNDS.looks()):
            sample = contrasts[:n]
            sd = float(np.std(sample, ddof=1))
            p_value = float(stats.ttest_1samp(sample, 0.0).pvalue)
            mde = minimum_detectable_effect(sd, n, paired=True, power=POWER)
            try:
                needed: int | None = seeds_needed(TARGET, sd, paired=True, power=POWER, max_seeds=MAX_SEEDS)
            except ValueError:
                needed = None
            state = claim_state(p_value, mde, TARGET, needed, index, ROUNDS, design)
            if state != UNDECIDED or index == len(ROUNDS.looks()) - 1:
                ended[f"{state} at round {index + 1}"] = ended.get(f"{state} at round {index + 1}", 0) + 1
                shown += state == SHOWN
                break
    return shown / PATHS, ended


@pytest.mark.parametrize("spending", ["obrien_fleming", "pocock"])
def test_rounds_keep_the_false_positive_rate_at_alpha(spending: str) -> None:
    design = round_design(tuple(ROUNDS.looks()), SIGNIFICANCE_LEVEL, spending, "paired")
    rate, ended = procedure_rejection_rate(design.nominal_alphas, np.random.default_rng(7))
    assert rate <= LIMIT, ended
    # the rules do take the claims through several rounds: the check is not of round 1 alone
    assert sum(count for name, count in ended.items() if not name.endswith("round 1")) > PATHS / 3, ended


def test_testing_every_round_at_alpha_would_inflate_it() -> None:
    """The check can fail: the same rounds judged at p < 0.05 each time."""
    rate, ended = procedure_rejection_rate([SIGNIFICANCE_LEVEL] * len(ROUNDS.looks()), np.random.default_rng(7))
    assert rate > LIMIT, ended


# --- on digits, through Ray and MLflow ---------------------------------------------------------

DIGITS_SPEC = {
    "name": "rounds-digits",
    "axes": {"dataset": ["digits"], "optimiser": ["bnew"], "ablation": ["baseline", "no_prelu", "binary_first_last"],
             "seed": {"start": 3, "step": 3, "max": 12}, "budget": [3]},
    "base": {"batch_size": 64, "device": "cpu"},
    "phases": {"pretrain": {"epochs": 3}},
    "optimisers": {"bnew": {"lambda_rate": 5.0, "freeze_epochs": 0}},
    "resources": {"cpu": 1},
    "max_failures": 1,
    "report": {"rows": ["ablation"], "claims": [
        {"name": "(c) ReLU instead of PReLU costs points", "contrast": {"ablation": ["no_prelu", "baseline"]},
         "paper_effect": -1.3, "smallest_effect": 20.0},
        {"name": "(a) binary first and last layers cost points", "contrast": {"ablation": ["binary_first_last",
                                                                                             "baseline"]},
         "paper_effect": -13.3, "smallest_effect": 0.5},
    ]},
}
LOOKS = [3, 6, 9, 12]
BASELINE = [60.0, 62.0, 58.0, 61.0, 59.0, 63.0]
CONTRASTS = {"no_prelu": [-12.0, -28.0, -20.0, -19.0, -21.0, -20.0], "binary_first_last": [-1.0, 2.0, -4.0]}
"""The test accuracy each quantise trial reports (`METRICS_ENV`), per seed: the baseline's, and
each ablation's contrast to it. (c) at 3 seeds: mean -20, sd 8, so p 0.049 (far above round 1's
boundary 7e-6) and an MDE of 26 > its 20 of interest, which 4 seeds would reach: undecided. At 6
seeds the sd falls to 5: p 2e-4 < round 2's boundary 0.0014, shown. (a): sd 3, so its 0.5 of
interest needs 285 seeds: out of reach at round 1, its cell keeps 3 seeds."""
ROUND_LINES = [
    "round 1 (up to 3 seeds per cell): (c) undecided at 3 seeds (p=0.0494, boundary 7.16e-06); "
    "(a) out of reach at 3 seeds (p=0.622, boundary 7.16e-06)",
    "round 2 (up to 6 seeds per cell): (c) shown at 6 seeds (p=0.000207, boundary 0.0014); "
    "(a) out of reach at 3 seeds (p=0.622, boundary 7.16e-06)",
]


def forced_accuracies() -> dict[tuple[str, int], float]:
    """(ablation, seed) -> the test accuracy its quantise trial reports."""
    values = {("baseline", seed): value for seed, value in enumerate(BASELINE)}
    return {**values, **{(ablation, seed): BASELINE[seed] + contrast for ablation, contrasts in CONTRASTS.items()
                         for seed, contrast in enumerate(contrasts)}}


def judged_rounds() -> list[Round]:
    """The rounds `judge_round` gives on the forced accuracies, as the driver runs them."""
    spec = parse_spec(DIGITS_SPEC, "rounds.yaml")
    frame = pd.DataFrame([(ablation, str(seed), value) for (ablation, seed), value in forced_accuracies().items()],
                         columns=["ablation", "seed", "value"])
    reached = {claim.name: LOOKS[0] for claim in spec.report.claims}
    played = []
    for number in (1, 2):
        judged, _ = judge_round(frame, spec, reached, load_paper_tables(), number)
        played.append(judged)
        reached.update({name: LOOKS[number] for name in judged.undecided})
    return played


def test_forced_accuracies_decide_claim_c_in_round_2() -> None:
    """The values the digits run below reports, through the judging alone: a change in the
    statistics shows here first."""
    first, second = judged_rounds()
    assert [judged.line() for judged in (first, second)] == ROUND_LINES
    c_first, a_first = first.looks
    assert (c_first.state, c_first.seeds_needed) == (UNDECIDED, 4)  # 4 <= max 12: within reach
    assert (a_first.state, a_first.seeds_needed) == (OUT_OF_REACH, 285)
    assert c_first.mde == pytest.approx(26.11, abs=0.01) and c_first.target == 20.0
    c_second, a_second = second.looks
    assert (c_second.state, c_second.seeds) == (SHOWN, 6) and a_second == a_first and not second.undecided
    assert c_second.p_value < c_second.threshold / 5  # far from the boundary, as p stays from round 1's


class Seen(Callback):
    """What a callback is told: each epoch's metrics and the final result's."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.final: dict = {}

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint: Path | None) -> None:
        self.epochs.append(metrics)

    def on_train_end(self, result: TrialResult) -> None:
        self.final = result.final_metrics


def test_forced_metrics_reach_every_callback_and_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`METRICS_ENV`: a matching run trains, but its callbacks and result carry the forced value;
    other metrics and other runs keep what the trainer measured."""
    (tmp_path / "forced.json").write_text(json.dumps({"g/bnew/*/seed1": {"test_acc_binary": 12.5}}))
    monkeypatch.setenv(METRICS_ENV, str(tmp_path / "forced.json"))
    assert forced_metrics("g/bnew/no_prelu/seed1") == {"test_acc_binary": 12.5} and not forced_metrics("g/bnew/x/seed2")
    config = TrialConfig.model_validate({
        "phase": "pretrain", "epochs": 2, "batch_size": 32, "device": "cpu", "max_batches": 2,
        "data": {"name": "synthetic", "synthetic_size": 128}, "output_dir": str(tmp_path / "out")})
    seen = Seen()
    result = train_forcing_metrics(config, [seen], None, forced_metrics("g/bnew/no_prelu/seed1"))
    assert [row["test_acc_binary"] for row in seen.epochs] == [12.5, 12.5] and seen.final["test_acc_binary"] == 12.5
    assert result.final_metrics["test_acc_binary"] == 12.5
    assert [row["test_acc_binary"] for row in result.history] == [12.5, 12.5]
    measured = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in seen.epochs] == [row["loss"] for row in measured]  # trained, not replaced


def bnew(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.mark.slow
def test_digits_rounds_seed_only_the_undecided_claim_and_stop_when_decided(tmp_path: Path) -> None:
    """Real digits training whose quantise trials report the forced accuracies: (c) is undecided
    after round 1 and shown after round 2 on every CPU."""
    (tmp_path / "rounds.yaml").write_text(yaml.safe_dump(DIGITS_SPEC))
    (tmp_path / "accuracies.json").write_text(json.dumps({
        f"rounds-digits/bnew/{ablation}/seed{seed}": {"test_acc_binary": value}
        for (ablation, seed), value in forced_accuracies().items()}))
    env = sweep_env(BNEW_PROJECT_DIR=str(tmp_path), **{METRICS_ENV: str(tmp_path / "accuracies.json")})

    # The first run loses round 2's first new seed for good: it stops after that round, exit 1.
    failing = {**env, "BNEW_SWEEP_FAULT": "rounds-digits/bnew/no_prelu/seed3@1:final"}
    first = bnew("sweep", "run", "rounds.yaml", "--local", cwd=tmp_path, env=failing)
    assert first.returncode == 1, (first.stdout + first.stderr)[-4000:]
    assert ROUND_LINES[0] in first.stdout, first.stdout[-4000:]
    assert "round 2 of at most 4" in first.stdout and "round 3 of" not in first.stdout
    assert "`bnew sweep resume rounds.yaml`" in first.stderr
    # resume replays round 1 from MLflow (nothing to train), finishes round 2, and stops: all decided
    run = bnew("sweep", "resume", "rounds.yaml", "--local", cwd=tmp_path, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "ERROR" not in output
    assert "round 1 of at most 4: 18 stages" in run.stdout and "18 stages reused, 0 to train" in run.stdout
    assert all(line in run.stdout for line in ROUND_LINES), run.stdout[-4000:]
    assert "rounds: every claim decided after round 2" in run.stdout and "round 3 of" not in run.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rounds-digits")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'sweep'")
    played = recorded_rounds(parent.data.tags)
    assert played == judged_rounds()  # the same numbers as judged here, from the trials' MLflow records

    seeds: dict[str, set[int]] = {}
    reported = {}
    for trial in client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'trial'"):
        if trial.data.tags["bnew.stage"] == "quantise" and trial.info.status == "FINISHED":
            ablation, seed = trial.data.tags["bnew.ablation"], int(trial.data.tags["bnew.seed"])
            seeds.setdefault(ablation, set()).add(seed)
            reported[ablation, seed] = trial.data.metrics["final_test_acc_binary"]
            assert trial.data.metrics["test_acc_binary"] == reported[ablation, seed]  # the epochs' too
    assert seeds == {"baseline": set(range(6)), "no_prelu": set(range(6)), "binary_first_last": {0, 1, 2}}
    assert reported == forced_accuracies()

    report = bnew("sweep", "report", "rounds-digits", "--out", str(tmp_path / "report"), cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Rounds: seeds {start: 3, step: 3, max: 12}" in text and "2 rounds run, stopped: every claim decided" in text
    assert all(f"- {line}" in text for line in ROUND_LINES)
    line = next(line for line in text.splitlines() if line.startswith("| (c) ReLU"))
    assert "| 0.000207 | — (boundary 0.0014) |" in line and "(n=6)" in line and "**holds**" in line
    line = next(line for line in text.splitlines() if line.startswith("| (a) binary"))
    assert "| 0.622 | — (boundary 7.16e-06) |" in line and "(n=3)" in line and "**not shown at this scale**" in line
    claims = pd.read_csv(tmp_path / "report" / "claims.csv")
    assert set(claims.correction) == {"sequential, bonferroni"} and claims.p_adjusted.isna().all()
    assert list(claims.n) == [6, 3] and list(claims.verdict) == ["holds", "not shown at this scale"]
    assert list(claims.p_value) == [look.p_value for look in played[-1].looks]
    assert list(claims.threshold) == [look.threshold for look in played[-1].looks]

    # status plans the rounds the sweep ran, every stage of them done, and prints the rounds
    status = bnew("sweep", "status", "rounds.yaml", cwd=tmp_path, env=env)
    assert status.returncode == 0 and ROUND_LINES[1] in status.stdout, status.stdout + status.stderr
    counts = sweep_status("rounds-digits", f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}").counts
    stages = 2 * 6 + 3  # two cells to round 2's 6 seeds, binary_first_last to 3
    assert counts["quantise"]["done"] == counts["pretrain"]["done"] == stages
    assert sum(counts["quantise"].values()) == sum(counts["pretrain"].values()) == stages
