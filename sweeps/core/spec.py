"""The sweep spec: one YAML file (or a shipped preset) that says which trials to cross and
where to run and record them. Validation names the offending key, before anything runs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from bnew_core.callbacks import EPOCH_METRICS
from bnew_core.config import (
    BmdConfig,
    BnewConfig,
    BnewError,
    BopConfig,
    DataConfig,
    DatasetName,
    ModelConfig,
    SteConfig,
    StrictModel,
    TrialConfig,
    format_validation_error,
    load_yaml,
)
from sweeps.core.addresses import is_local, local_folder
from sweeps.core.dotted import deep_merge, flatten
from sweeps.core.schema import AXES, tag_value

PRESET_DIR = Path(__file__).parent.parent / "presets"
PAPER_TABLES_PATH = Path(__file__).parent.parent / "paper_tables.json"
"""The paper's tables (package data copied from shared/paper/tables.json)."""

Method = Literal["ste", "bmd", "bop", "bnew", "real"]
"""A weight-binarisation optimiser, or `real` for the real-valued network (no quantise phase)."""

ABLATIONS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "no_learnable_bias": {"model": {"learnable_bias": False}},
    "no_prelu": {"model": {"activation": "relu"}},
    "no_scale": {"model": {"scale": False}},
    "no_distillation": {"distillation": False},
    "classic_ste": {"model": {"estimator": "ste"}},
    "binary_first_last": {"model": {"binary_first_last": True}},
    "binary_bottlenecks": {"model": {"binary_bottleneck": True}},
    "no_pretrain": {},  # the planner drops the pretrain stage
    "regulariser_l1": {"optimiser": {"regulariser": "l1"}},
    "regulariser_l2": {"optimiser": {"regulariser": "l2"}},
    "no_scale_classic_ste": {"model": {"scale": False, "estimator": "ste"}},
}
"""Table 2 rows (keys exactly as in tables.json) and the TrialConfig changes each makes."""
BNEW_ONLY_ABLATIONS = {"regulariser_l1", "regulariser_l2"}
Ablation = Literal[tuple(ABLATIONS)]  # type: ignore[valid-type]

FIXED_AXES = AXES
"""Axes with their own field; `params` crosses any other trainer field."""
AXIS_OWNED_FIELDS = {
    "phase": "the planner", "data.name": "axes.dataset", "optimiser.name": "axes.optimiser",
    "seed": "axes.seed", "epochs": "axes.budget (quantise) or phases.<phase>.epochs",
    "distillation": "axes.distillation", "teacher_checkpoint": "the planner",
    "init_checkpoint": "the planner", "output_dir": "the sweep runner",
    "checkpoint_every": "checkpoint.every_epochs", "checkpoint_minutes": "checkpoint.every_minutes",
}
"""TrialConfig fields a sweep sets itself: giving them in base/phases/params is an error."""
OPTIMISER_MODELS = {"ste": SteConfig, "bmd": BmdConfig, "bop": BopConfig, "bnew": BnewConfig}
SECTION_MODELS: dict[str, type[BaseModel]] = {"data": DataConfig, "model": ModelConfig}


def optimiser_field_owners(field: str) -> list[str]:
    """Names of the optimisers whose config has `field`."""
    return [name for name, model in OPTIMISER_MODELS.items() if field in model.model_fields and field != "name"]


def check_trial_keys(mapping: dict[str, Any], where: str, nested: bool = True, allow: tuple[str, ...] = ()) -> None:
    """Reject keys that are no TrialConfig field (or that the sweep sets itself), naming them.

    `nested` mappings look like TrialConfig YAML (`model: {scale: false}`); otherwise keys are
    dotted (`model.scale`)."""
    flat = flatten(mapping) if nested else mapping
    for dotted in flat:
        section, _, leaf = dotted.partition(".")
        if dotted in AXIS_OWNED_FIELDS and dotted not in allow:
            raise ValueError(f"{where}.{dotted}: set by {AXIS_OWNED_FIELDS[dotted]}, not here")
        if section not in TrialConfig.model_fields:
            raise ValueError(f"{where}.{section}: not a trainer setting (see bnew_core/config.py)")
        if section == "optimiser" and nested:
            raise ValueError(f"{where}.{dotted}: optimiser settings go under optimisers.<name>")
        if section == "optimiser":
            known = bool(leaf) and bool(optimiser_field_owners(leaf))
        elif section in SECTION_MODELS and leaf:
            known = leaf in SECTION_MODELS[section].model_fields
        else:
            known = not leaf
        if not known:
            raise ValueError(f"{where}.{dotted}: not a trainer setting (see bnew_core/config.py)")


class SearchSpace(StrictModel):
    """A Tune search space for a hyperparameter axis, sampled `samples` times at plan time
    (seeded, so a plan and its stage keys are reproducible). Exactly one distribution."""

    uniform: tuple[StrictFloat, StrictFloat] | None = None
    loguniform: tuple[StrictFloat, StrictFloat] | None = None
    randint: tuple[StrictInt, StrictInt] | None = None
    """Integers in [low, high)."""
    choice: list[Any] | None = Field(None, min_length=1)
    samples: StrictInt = Field(gt=0)
    """How many values to draw."""
    seed: StrictInt = 0
    """Seed of the draw."""

    @model_validator(mode="after")
    def _one_distribution(self) -> "SearchSpace":
        given = [name for name in ("uniform", "loguniform", "randint", "choice") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of uniform, loguniform, randint, choice (got {given or 'none'})")
        for name in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, name)
            if bounds is not None and bounds[0] >= bounds[1]:
                raise ValueError(f"{name}: the low bound {bounds[0]} must be below the high bound {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive, got {self.loguniform[0]}")
        return self

    def domain(self) -> Any:
        """The distribution as Ray Tune's search space (what its searchers sample)."""
        from ray import tune  # heavy: only a spec with a search space needs Ray to plan

        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        if self.randint is not None:
            return tune.randint(*self.randint)
        return tune.choice(self.choice)

    def values(self) -> list[Any]:
        """The drawn values, via Ray Tune's own samplers."""
        import numpy as np  # heavy: as domain()

        drawn = self.domain().sample(size=self.samples, random_state=np.random.RandomState(self.seed))
        drawn = drawn if self.samples > 1 else [drawn]  # Tune returns one value unlisted
        return [value.item() if hasattr(value, "item") else value for value in drawn]


class SeedRounds(StrictModel):
    """Adaptive seeds (`axes.seed: {start: 3, step: 2, max: 12}`): the sweep runs `start` seeds
    per cell, tests the report's claims, and adds `step` more seeds (up to `max`) only to the cells
    of the claims still undecided, round after round, until every claim is decided. Each claim is
    tested at every round against a group-sequential boundary (`spending`), so the looks do not
    inflate its false-positive rate (`sweeps.analysis.rounds`). Round r runs seeds `first` to
    `first + n_r - 1`, so earlier seeds' stages are reused, never retrained."""

    start: StrictInt = Field(3, ge=2)
    """Seeds per cell in the first round (a paired test needs 2)."""
    step: StrictInt = Field(2, ge=1)
    """Seeds each later round adds to the cells of undecided claims."""
    max: StrictInt = Field(12, ge=2)
    """The most seeds a cell gets; the last round runs exactly this many."""
    first: StrictInt = Field(0, ge=0)
    """The first seed."""
    spending: Literal["obrien_fleming", "pocock"] = "obrien_fleming"
    """How alpha is spent across the rounds: O'Brien-Fleming keeps almost all of it for the last
    round (early rounds stop only on strong evidence), Pocock spends it evenly."""
    skip_out_of_reach: bool = True
    """Give no more seeds to a claim that even `max` seeds would not give 80% power for its effect
    of interest, at the spread observed (it is `out of reach`: those seeds would not decide it);
    false: every claim not yet decided gets seeds until `max`."""

    @model_validator(mode="after")
    def _start_within_max(self) -> "SeedRounds":
        if self.max < self.start:
            raise ValueError(f"max ({self.max}) is below start ({self.start})")
        return self

    def looks(self) -> list[int]:
        """The seed counts the rounds run: `{start: 3, step: 2, max: 12}` -> [3, 5, 7, 9, 11, 12]."""
        looks = list(range(self.start, self.max + 1, self.step))
        return looks if looks[-1] == self.max else [*looks, self.max]

    def seeds(self, count: int) -> list[int]:
        """The first `count` seeds."""
        return list(range(self.first, self.first + count))


def seed_form(value: Any) -> str:
    """Which form `axes.seed` takes, so that an error names that form only: a mapping is rounds,
    anything else a list (its tag is empty, and left out of error locations: `axes.seed.0`)."""
    return "rounds" if isinstance(value, (dict, SeedRounds)) else ""


class Axes(StrictModel):
    """The values to cross. Every list must be non-empty."""

    dataset: list[DatasetName] = Field(["digits"], min_length=1)
    optimiser: list[Method] = Field(["ste", "bmd", "bop", "bnew"], min_length=1)
    ablation: list[Ablation] = Field(["baseline"], min_length=1)  # type: ignore[valid-type]
    """Table 2 rows; `baseline` is the unablated network."""
    seed: Annotated[
        Annotated[list[StrictInt], Field(min_length=1), Tag("")] | Annotated[SeedRounds, Tag("rounds")],
        Discriminator(seed_form),
    ] = [0]
    """Seeds to cross, or adaptive rounds of seeds that decide the report's claims (`SeedRounds`)."""
    budget: list[StrictInt] = Field([200], min_length=1)
    """Epochs of the final stage (quantise, or the real-valued run)."""
    distillation: list[bool] = Field([False], min_length=1)
    params: dict[str, list[Any] | SearchSpace] = {}
    """Any other trainer field of the final stage by dotted key (`lr`, `optimiser.lambda_rate`):
    a list of values or a search space. An `optimiser.*` key only crosses optimisers that have it."""

    @property
    def seed_rounds(self) -> SeedRounds | None:
        return self.seed if isinstance(self.seed, SeedRounds) else None

    def values(self, axis: str) -> list[Any]:
        """A fixed axis's values; adaptive seeds give the first round's."""
        if axis == "seed" and self.seed_rounds is not None:
            return self.seed_rounds.seeds(self.seed_rounds.start)
        return getattr(self, axis)

    @field_validator("budget")
    @classmethod
    def _positive_budgets(cls, budgets: list[int]) -> list[int]:
        if any(budget <= 0 for budget in budgets):
            raise ValueError("budgets are epochs and must be positive")
        return budgets

    @field_validator("params", mode="before")
    @classmethod
    def _known_params(cls, params: Any) -> Any:
        """Each axis a non-empty list or a search space, validated here so that an error names
        the axis once (not once per member of the union)."""
        if not isinstance(params, dict):
            return params  # pydantic names the type error
        check_trial_keys(params, "params", nested=False)
        checked: dict[str, Any] = {}
        for key, values in params.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"params.{key}: empty axis")
            if isinstance(values, dict):
                try:
                    values = SearchSpace.model_validate(values)
                except ValidationError as exc:
                    raise ValueError(format_validation_error(exc, f"params.{key}")) from None
            elif not isinstance(values, list):
                raise ValueError(f"params.{key}: a list of values or a search space "
                                 f"({{loguniform: [LOW, HIGH], samples: N}}), not {values!r}")
            checked[key] = values
        return checked


class Selector(StrictModel):
    """A partial grid point for `exclude`/`include`: each given axis is a value or a list of values."""

    dataset: DatasetName | list[DatasetName] | None = None
    optimiser: Method | list[Method] | None = None
    ablation: Ablation | list[Ablation] | None = None  # type: ignore[valid-type]
    seed: StrictInt | list[StrictInt] | None = None
    budget: StrictInt | list[StrictInt] | None = None
    distillation: bool | list[bool] | None = None
    params: dict[str, Any] = {}

    @field_validator("params")
    @classmethod
    def _known_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        check_trial_keys(params, "params", nested=False)
        return params

    def choices(self) -> dict[str, list[Any]]:
        """Given axes (params by their dotted key) as lists of allowed values."""
        given = {axis: getattr(self, axis) for axis in FIXED_AXES if getattr(self, axis) is not None}
        given.update(self.params)
        return {axis: value if isinstance(value, list) else [value] for axis, value in given.items()}


class PhaseSettings(StrictModel):
    """Trainer settings per phase, over `base` (TrialConfig YAML, e.g. `{epochs: 200, lr: 0.1}`)."""

    teacher: dict[str, Any] = {}
    pretrain: dict[str, Any] = {}
    quantise: dict[str, Any] = {}
    real: dict[str, Any] = {}


class Resources(StrictModel):
    """What one trial reserves on the Ray cluster."""

    cpu: StrictFloat = Field(1.0, gt=0)
    gpu: StrictFloat = Field(0.0, ge=0)
    """Fractions share a GPU between trials (e.g. 0.25: four trials per GPU)."""


class CheckpointSettings(StrictModel):
    """How often a trial writes the resumable checkpoint that Tune keeps and a retry resumes from:
    every `every_epochs` epochs or `every_minutes` minutes, whichever comes first, and always
    after the last epoch. Each one costs a write and a copy into Tune's storage, and Tune saves
    its experiment state after every second checkpoint of a trial (`num_to_keep=2`), so the
    defaults suit long trials: a failure redoes at most 10 epochs or 15 minutes."""

    every_epochs: StrictInt = Field(10, gt=0)
    every_minutes: StrictFloat = Field(15.0, gt=0)

    def trainer_fields(self) -> dict[str, Any]:
        """The TrialConfig fields that carry the setting to the trainer."""
        return {"checkpoint_every": self.every_epochs, "checkpoint_minutes": self.every_minutes}


class PaperEffect(StrictModel):
    """A claim's effect in the paper, from cells of a table in tables.json: the sum of the
    `plus` cells minus the sum of the `minus` cells, each cell `[row, column]`."""

    table: str
    """Key in tables.json (table1_cifar100_budget, table2_ablation)."""
    plus: list[tuple[str, str]] = Field(min_length=1)
    minus: list[tuple[str, str]] = Field(min_length=1)


class ClaimSpec(StrictModel):
    """A claim tested as a contrast of grid cells, one value per seed and cell: a paired t-test
    on the per-seed contrast when the cells share seeds, else Welch's t-test
    (`sweeps.analysis.statistics.contrast_test`).

    `contrast: {ablation: [binary_first_last, baseline]}` is treated minus control; with
    `versus: {optimiser: [bnew, ste]}` it is the difference of that contrast between the two
    versus values (does BNEW gain more from the longer budget than STE?)."""

    name: str
    contrast: dict[str, tuple[Any, Any]] = Field(min_length=1, max_length=1)
    """One axis: [treated value, control value]."""
    versus: dict[str, tuple[Any, Any]] = Field({}, max_length=1)
    """Optional second axis: the contrast's difference between its first and second value."""
    where: dict[str, Any] = {}
    """Axis values every compared cell has (e.g. {optimiser: bnew, budget: 3})."""
    paper_effect: float | PaperEffect
    """The paper's effect (points), a number or cells of tables.json; its sign is the claim's direction."""
    smallest_effect: float | None = Field(None, gt=0)
    """The smallest |effect| (points) worth detecting here; default the paper's |effect|. The report
    gives the seeds per cell that detect it with 80% power, and calls a claim whose CI holds 0
    undecided when its current seeds could not have detected it."""

    @model_validator(mode="after")
    def _axes_apart(self) -> "ClaimSpec":
        overlap = (set(self.contrast) | set(self.versus)) & set(self.where) | set(self.contrast) & set(self.versus)
        if overlap:
            raise ValueError(f"{self.name!r}: axis {sorted(overlap)[0]} is given twice (contrast, versus, where)")
        return self

    def axes(self) -> set[str]:
        return {*self.contrast, *self.versus, *self.where}

    def cells(self) -> list[tuple[dict[str, str], int]]:
        """The compared cells as selectors of tag text (contrast and versus axes first, then
        `where`), each with its contrast coefficient."""
        (axis, (treated, control)), = self.contrast.items()
        where = {key: tag_value(key, value) for key, value in self.where.items()}
        sides = [({axis: tag_value(axis, treated)}, 1), ({axis: tag_value(axis, control)}, -1)]
        if not self.versus:
            return [({**side, **where}, sign) for side, sign in sides]
        (versus_axis, (first, second)), = self.versus.items()
        return [
            ({**side, versus_axis: tag_value(versus_axis, value), **where}, sign * versus_sign)
            for value, versus_sign in ((first, 1), (second, -1))
            for side, sign in sides
        ]


class ReportSpec(StrictModel):
    """How `bnew sweep report` lays the results out."""

    rows: list[str] = Field(["optimiser"], min_length=1)
    """Axis names for the table rows (e.g. [optimiser] or [ablation])."""
    columns: list[str] = []
    """Axis names for the columns (e.g. [budget, distillation] or [optimiser])."""
    paper_table: str | None = None
    """Key in tables.json to compare with (table1_cifar100_budget, table2_ablation)."""
    baseline: str | None = None
    """Row value to t-test the others against (e.g. baseline)."""
    metric: str = "test_acc_binary"
    select: Literal["final", "best_val"] = "final"
    """Which epoch's `metric` a run reports: its last, or the one of its best binary validation
    accuracy (the authors' choice for STE and BMD; needs `data.val_size` > 0)."""
    claims: list[ClaimSpec] = []
    """Claims to give a verdict on (holds / not shown at this scale / contradicted)."""
    correction: Literal["holm", "bh", "none"] = "holm"
    """Multiplicity adjustment of the p-values, over the report's claims as one family and over
    each table's comparisons against its reference as one family per table: `holm` bounds the
    chance of any false verdict (family-wise), `bh` (Benjamini-Hochberg) the expected share of
    false ones among those declared; verdicts and stars use the adjusted p."""

    @field_validator("paper_table")
    @classmethod
    def _known_table(cls, table: str | None) -> str | None:
        tables = [key for key in json.loads(PAPER_TABLES_PATH.read_text()) if key != "source"]
        if table is not None and table not in tables:
            raise ValueError(f"{table!r} is not a table of the paper ({', '.join(tables)})")
        return table

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in EPOCH_METRICS:
            raise ValueError(f"{metric!r} is not a metric the trainer reports ({', '.join(EPOCH_METRICS)})")
        return metric


class SearchSettings(StrictModel):
    """How the `axes.params` search spaces are searched, per cell of the grid (each optimiser,
    ablation, dataset, budget and distillation point).

    `grid` and `random` cross the params at plan time (lists as given, search spaces drawn
    `samples` times each); `optuna` tunes each cell with Ray Tune's `OptunaSearch`: `samples`
    suggestions per cell, each trained on every seed of the cell, the mean over the seeds being
    the objective (Tune's `Repeater`)."""

    algorithm: Literal["grid", "random", "optuna"] = "grid"
    metric: str = "val_acc_binary"
    """The epoch metric the search optimises; a validation metric, never the test set's."""
    mode: Literal["max", "min"] = "max"
    samples: StrictInt = Field(10, gt=0)
    """Suggestions per cell (optuna); each is one trial per seed."""

    @field_validator("metric")
    @classmethod
    def _tunable_metric(cls, metric: str) -> str:
        if metric not in EPOCH_METRICS:
            raise ValueError(f"{metric!r} is not a metric the trainer reports ({', '.join(EPOCH_METRICS)})")
        if metric.startswith("test_"):
            raise ValueError(f"{metric!r} is measured on the test set; tune on val_acc_binary")
        return metric


class SchedulerSettings(StrictModel):
    """Early stopping of tuned final stages by Ray Tune's `ASHAScheduler` (`asha`) or
    `MedianStoppingRule` (`median`), on `search.metric` per epoch."""

    name: Literal["asha", "median"] = "asha"
    grace_epochs: StrictInt | None = Field(None, gt=0)
    """Epochs every trial trains before it may be stopped. Default: up to the first frozen epoch
    for optimisers that end with a freeze (BNEW, BMD: their binary accuracy before it is near
    chance for the settings that end best), 1 for the others."""
    reduction_factor: StrictFloat = Field(3.0, gt=1)
    """ASHA: the share of trials kept at each rung is 1/reduction_factor."""


class SweepSpec(StrictModel):
    """A whole sweep: the grid, the trainer settings, and where it runs and is recorded."""

    name: str
    """MLflow experiment and Tune experiment name: letters, digits, `.`, `_`, `-`."""
    grid: str | None = None
    """Label of the grid in run names and the `bnew.grid` tag (table1, table2, main). Default: name."""
    description: str = ""
    axes: Axes = Axes()
    exclude: list[Selector] = []
    """Grid points to drop, e.g. `{optimiser: ste, ablation: [regulariser_l1, regulariser_l2]}`."""
    include: list[Selector] = []
    """Extra points; axes a selector leaves out take every value of `axes` (e.g. the real row)."""
    base: dict[str, Any] = {}
    """Trainer settings (TrialConfig YAML) shared by every stage."""
    phases: PhaseSettings = PhaseSettings()
    datasets: dict[DatasetName, dict[str, Any]] = {}
    """DataConfig settings per dataset (root, val_size, ...)."""
    optimisers: dict[Literal["ste", "bmd", "bop", "bnew"], dict[str, Any]] = {}
    """Optimiser settings per optimiser (e.g. `bnew: {lambda_rate: 0.01}`)."""
    resources: Resources = Resources()
    max_concurrent: StrictInt | None = Field(None, gt=0)
    """Most trials at once; default as many as the resources fit."""
    max_failures: StrictInt = Field(2, ge=0)
    """Retries of a failed trial, each from its last checkpoint."""
    checkpoint: CheckpointSettings = CheckpointSettings()
    storage_path: str | None = None
    """Tune storage (checkpoints, experiment state): a shared path or URI (s3://...) on a cluster.
    Default `.bnew/ray_results` in the project directory."""
    tracking_uri: str | None = None
    """MLflow tracking URI. Default `sqlite:///<project>/.bnew/mlflow.db`; on a cluster an
    `http(s)://` server (`mlflow server --serve-artifacts`), so workers never log to local paths."""
    report: ReportSpec | None = None
    search: SearchSettings | None = None
    """Tuning of the `axes.params` search spaces (default: the plan crosses them, as `grid`)."""
    scheduler: SchedulerSettings | None = None
    """Early stopping of the tuned final stages (needs `search.algorithm: optuna`)."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"{name!r}: use letters, digits, '.', '_' and '-' only")
        return name

    @model_validator(mode="after")
    def _check_settings(self) -> "SweepSpec":
        # Prerequisite phases take their epochs from the settings; final stages from axes.budget.
        check_trial_keys(self.base, "base", allow=("epochs",))
        for phase in PhaseSettings.model_fields:
            allow = ("epochs",) if phase in ("teacher", "pretrain") else ()
            check_trial_keys(getattr(self.phases, phase), f"phases.{phase}", allow=allow)
        for dataset, settings in self.datasets.items():
            check_trial_keys({"data": settings}, f"datasets.{dataset}")
        for optimiser, settings in self.optimisers.items():
            for key in settings:
                if OPTIMISER_MODELS[optimiser].model_fields.get(key) is None or key == "name":
                    raise ValueError(f"optimisers.{optimiser}.{key}: not a setting of {optimiser}")
        for index, selector in enumerate(self.exclude + self.include):
            section = "exclude" if index < len(self.exclude) else "include"
            position = index if section == "exclude" else index - len(self.exclude)
            for key in selector.params:
                if key not in self.axes.params:
                    raise ValueError(f"{section}.{position}.params.{key}: not an axis (add it to axes.params)")
        if self.report is not None:
            axes = {*FIXED_AXES, *self.axes.params}
            for key in self.report.rows + self.report.columns:
                if key not in axes:
                    raise ValueError(f"report: {key!r} is not an axis ({', '.join(sorted(axes))})")
            for index, claim in enumerate(self.report.claims):
                for key in sorted(claim.axes() - axes):
                    raise ValueError(f"report.claims.{index}: {key!r} is not an axis ({', '.join(sorted(axes))})")
            if self.report.select == "best_val" and not self.has_validation_split():
                raise ValueError("report.select: best_val needs a validation split; set data.val_size > 0 "
                                 "(base.data.val_size or datasets.<name>.val_size)")
        self._check_search()
        self._check_seed_rounds()
        return self

    def _check_seed_rounds(self) -> None:
        if self.axes.seed_rounds is None:
            return
        if self.report is None or not self.report.claims:
            raise ValueError("axes.seed: seed rounds add seeds until report.claims are decided; "
                             "the spec has no report.claims (or give the seeds as a list)")
        for index, claim in enumerate(self.report.claims):
            if "seed" in claim.axes():
                raise ValueError(f"report.claims.{index}: 'seed' is the axis the rounds add to; a claim cannot fix it")
        if self.search is not None:
            raise ValueError("axes.seed: seed rounds and search do not combine (give the seeds as a list)")

    def _check_search(self) -> None:
        if self.scheduler is not None and (self.search is None or self.search.algorithm != "optuna"):
            raise ValueError("scheduler: early stopping needs search.algorithm: optuna")
        if self.search is None:
            return
        if not self.has_validation_split():
            raise ValueError(f"search: tuning on {self.search.metric} needs a validation split, never the test set; "
                             "set data.val_size > 0 (base.data.val_size or datasets.<name>.val_size)")
        if self.search.algorithm == "optuna" and not self.tuned_params():
            raise ValueError("search.algorithm: optuna needs a search space in axes.params "
                             "(e.g. optimiser.lambda_rate: {loguniform: [0.01, 10], samples: 1})")

    def tuned_params(self) -> dict[str, SearchSpace]:
        """The `axes.params` search spaces that Optuna tunes per cell (none unless `search.algorithm` is optuna)."""
        if self.search is None or self.search.algorithm != "optuna":
            return {}
        return {key: space for key, space in self.axes.params.items() if isinstance(space, SearchSpace)}

    def crossed_params(self) -> dict[str, list[Any]]:
        """The `axes.params` the plan crosses, each as its list of values (a search space drawn
        `samples` times); those Optuna tunes are drawn while the sweep runs, not here."""
        tuned = self.tuned_params()
        return {key: list(v) if isinstance(v, list) else v.values() for key, v in self.axes.params.items()
                if key not in tuned}

    def has_validation_split(self) -> bool:
        """Whether base, the final phases or any dataset settings hold out validation images."""
        layers = [self.base.get("data", {}), self.phases.quantise.get("data", {}), self.phases.real.get("data", {})]
        return any((layer or {}).get("val_size") for layer in [*layers, *self.datasets.values()])

    @property
    def grid_label(self) -> str:
        return self.grid or self.name

    def resolved_tracking_uri(self) -> str:
        """The spec's tracking URI, else `MLFLOW_TRACKING_URI` (how a cluster points every node at
        its server), else a SQLite store under the project directory. Relative SQLite paths are
        made absolute: Tune trials run in other working directories."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///.bnew/mlflow.db"
        if uri.startswith("sqlite:///"):
            return f"sqlite:///{project_dir() / uri.removeprefix('sqlite:///')}"
        return uri

    def resolved_storage_path(self) -> str:
        """Tune's storage path, absolute (Tune requires it): the spec's, else `BNEW_STORAGE_PATH`
        (a folder shared by the cluster's nodes), else `.bnew/ray_results` in the project. A local
        folder (a path or `file://`) is a plain absolute path; a bucket (`s3://`) stays a URI."""
        storage = self.storage_path or os.environ.get("BNEW_STORAGE_PATH") or ".bnew/ray_results"
        if not is_local(storage):
            return storage
        return str((project_dir() / local_folder(storage)).resolve())


def project_dir() -> Path:
    """Where local stores live: `BNEW_PROJECT_DIR`, else the current directory."""
    return Path(os.environ.get("BNEW_PROJECT_DIR", ".")).resolve()


def data_dir() -> Path:
    """What relative dataset roots (`root: data/cifar100`) are read from: `BNEW_DATA_DIR`, the
    folder every node of a cluster mounts, else the project directory."""
    return Path(os.environ["BNEW_DATA_DIR"]).resolve() if os.environ.get("BNEW_DATA_DIR") else project_dir()


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def parse_spec(data: dict[str, Any], source: str) -> SweepSpec:
    """Validate a spec mapping; errors become one `BnewError` line naming the key."""
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise BnewError(format_validation_error(exc, source)) from None


def load_spec(name_or_path: str, settings: dict[str, Any] | None = None) -> SweepSpec:
    """A spec from a YAML file, or a shipped preset by name (`demo`, `paper-table2`, ...), with
    `settings` (dotted `--set` keys) over it, validated as one spec."""
    path = Path(name_or_path)
    if not path.is_file():
        if name_or_path not in preset_names():
            raise BnewError(
                f"{name_or_path}: no such spec file or preset (presets: {', '.join(preset_names())})"
            )
        path = PRESET_DIR / f"{name_or_path}.yaml"
    data = load_yaml(path)
    if not settings:
        return parse_spec(data, str(path))
    return parse_spec(with_settings(data, settings), f"{path} with --set {', '.join(settings)}")


def with_settings(data: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """`--set` pairs over a spec mapping, each dotted key down its sections (`base.batch_size`);
    under `axes.params` the rest of the key is one param (`axes.params.optimiser.lambda_rate`).
    A list or a scalar replaces what the spec had; a mapping merges into it."""
    for key, value in settings.items():
        path = key.split(".")
        if path[:2] == ["axes", "params"] and len(path) > 3:
            path = [*path[:2], ".".join(path[2:])]
        layer: Any = value
        for part in reversed(path):
            layer = {part: layer}
        data = deep_merge(data, layer)
    return data


def dump_spec(spec: SweepSpec) -> str:
    """The spec as YAML, as `load_spec` reads it back."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

