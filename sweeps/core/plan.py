"""Expand a sweep spec into stages: teachers, pretrained models, quantise and real-valued runs.

A stage is one training run, identified by a content key (a hash of its resolved trainer config
and of its inputs' keys), so a stage shared by many trials appears once, and a stage already
finished in the MLflow store, by this sweep or another, is reused instead of retrained.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from bnew_core.config import BnewError, Phase, TrialConfig, build_trial_config
from sweeps.core.dotted import deep_merge, flatten, nest
from sweeps.core.schema import FINAL_PHASES, axis_tag, tag_value
from sweeps.core.spec import (
    ABLATIONS,
    BNEW_ONLY_ABLATIONS,
    FIXED_AXES,
    OPTIMISER_MODELS,
    SweepSpec,
    data_dir,
    optimiser_field_owners,
)

RUN_SPECIFIC_FIELDS = ("name", "output_dir", "teacher_checkpoint", "init_checkpoint")
"""Set when a stage runs, not part of its stored config."""
KEY_EXCLUDED_FIELDS = {
    "device", "checkpoint_every", "checkpoint_minutes", "eval_batch_size", "channels_last", "compile",
    "data.root", "data.download",
}
"""Fields that change where or how fast a stage runs, not what it learns: left out of the key."""
MAX_TRIALS = 1000
"""Larger sweeps need `--yes`: one axis too many can multiply a sweep's cost unnoticed."""
ROOTED_DATASETS = ("cifar10", "cifar100", "imagefolder")
"""Datasets read from `data.root` (torchvision's default root is `data`)."""


@dataclass(frozen=True)
class Role:
    """One labelled trial of the sweep, recorded as its own MLflow run."""

    name: str
    """Readable run name: grid/optimiser-or-phase/ablation[/other axes]/seedN."""
    tags: dict[str, str]
    """`bnew.*` axis tags (grid, stage, dataset, optimiser, ablation, seed, budget, distillation)."""


@dataclass
class Stage:
    """One training run; several roles share it when their trainer configs are identical."""

    key: str
    phase: Phase
    config: dict[str, Any]
    """The validated TrialConfig (JSON form) without its run-specific fields."""
    inputs: dict[str, str] = field(default_factory=dict)
    """TrialConfig path field (teacher_checkpoint, init_checkpoint) -> key of the stage providing model.pt."""
    roles: list[Role] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.roles[0].name

    @property
    def epochs(self) -> int:
        return self.config["epochs"]

    @property
    def depth(self) -> int:
        """0 for a teacher, 1 for a pretrain, 2 for a final stage (for running deep stages first)."""
        return {"teacher": 0, "pretrain": 1}.get(self.phase, 2)

    def trial_config(self, output_dir: Path, input_paths: dict[str, Path]) -> TrialConfig:
        """The runnable TrialConfig, with its output directory and downloaded input models."""
        data = copy.deepcopy(self.config)
        data.update(name=self.name.replace("/", "-"), output_dir=str(output_dir))
        data.update({field_name: str(path) for field_name, path in input_paths.items()})
        return build_trial_config(data, self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage":
        roles = [Role(**role) for role in data["roles"]]
        return cls(**{**data, "roles": roles})


@dataclass
class Plan:
    """Every stage of a sweep, inputs before the stages that use them."""

    spec: SweepSpec
    stages: dict[str, Stage]
    max_epochs: int | None = None
    max_batches: int | None = None
    """Debug caps the plan was built with (they change stage keys)."""

    def of_phase(self, phase: str) -> list[Stage]:
        return [stage for stage in self.stages.values() if stage.phase == phase]

    def trial_roles(self) -> list[Role]:
        """The sweep's trials: the roles of quantise and real-valued stages."""
        return [role for stage in self.stages.values() if stage.phase in FINAL_PHASES for role in stage.roles]

    def epochs(self, keys: set[str] | None = None) -> int:
        return sum(stage.epochs for key, stage in self.stages.items() if keys is None or key in keys)


def stage_key(config: dict[str, Any], inputs: dict[str, str]) -> str:
    """Content key: hash of what the stage learns from (config and inputs' keys)."""
    flat = {k: v for k, v in flatten(config).items() if k not in KEY_EXCLUDED_FIELDS}
    payload = json.dumps({"config": flat, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def param_applies(key: str, optimiser: str) -> bool:
    """`optimiser.lambda_rate` crosses only the optimisers that have a lambda_rate."""
    section, _, leaf = key.partition(".")
    return section != "optimiser" or not leaf or optimiser in optimiser_field_owners(leaf)


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The crossed axes, minus exclusions, plus inclusions, without duplicates (fast enough to
    count a mistyped 100,000-trial grid before refusing it)."""
    axes: dict[str, list[Any]] = {axis: spec.axes.values(axis) for axis in FIXED_AXES}
    axes.update(spec.crossed_params())
    excluded = [selector.choices() for selector in spec.exclude]
    points = [point for point in (dict(zip(axes, combo)) for combo in product(*axes.values()))
              if not any(all(point.get(axis) in allowed for axis, allowed in choices.items()) for choices in excluded)]
    for selector in spec.include:
        choices = {**axes, **selector.choices()}
        points += [dict(zip(choices, combo)) for combo in product(*choices.values())]
    applies = functools.cache(param_applies)
    unique: dict[str, dict[str, Any]] = {}
    for point in points:
        point = {axis: value for axis, value in point.items() if applies(axis, point["optimiser"])}
        unique.setdefault(repr(sorted(point.items())), point)
    return list(unique.values())


def grid_factors(spec: SweepSpec) -> dict[str, int]:
    """What multiplies the sweep's trials, by spec key (`axes.seed`, `axes.params.lr`, and
    `search.samples` where a search tunes a param) -> its count, largest first: the refusal of an
    oversized grid names the axis that makes it so."""
    factors = {f"axes.{axis}": len(spec.axes.values(axis)) for axis in FIXED_AXES}
    factors.update({f"axes.params.{key}": len(values) for key, values in spec.crossed_params().items()})
    if spec.search is not None and spec.tuned_params():
        factors["search.samples"] = spec.search.samples
    return dict(sorted(factors.items(), key=lambda item: -item[1]))


def check_combination(point: dict[str, Any], source: str) -> None:
    """Reject points no trainer config can express, naming the axis and the fix."""
    ablation, optimiser = point["ablation"], point["optimiser"]
    if ablation in BNEW_ONLY_ABLATIONS and optimiser != "bnew":
        raise BnewError(
            f"{source}: axes.ablation: {ablation} applies to bnew only, not {optimiser} "
            f"(add exclude: [{{optimiser: {optimiser}, ablation: {ablation}}}])"
        )
    if optimiser == "real" and ablation != "baseline":
        raise BnewError(
            f"{source}: axes.ablation: {ablation} does not apply to the real-valued network "
            f"(optimiser real); exclude it or add the real row through include"
        )


class PlanBuilder:
    """Builds stages point by point, merging identical ones by key."""

    def __init__(self, spec: SweepSpec, source: str, max_epochs: int | None, max_batches: int | None):
        self.spec, self.source = spec, source
        self.max_epochs, self.max_batches = max_epochs, max_batches
        self.stages: dict[str, Stage] = {}
        self.varying = {axis for axis in FIXED_AXES if len(spec.axes.values(axis)) > 1}
        self.varying |= {key for key, values in spec.crossed_params().items() if len(set(map(str, values))) > 1}
        self.names: dict[str, str] = {}
        """Run name -> stage key, to keep names unique."""
        self.prerequisites: dict[tuple[Any, ...], str] = {}
        """What a prerequisite depends on -> its stage key: every optimiser, budget and param of a
        seed shares it, so it is validated and keyed once (20,000 trials plan in about half the time)."""

    def add_point(self, point: dict[str, Any]) -> None:
        check_combination(point, self.source)
        ablation = ABLATIONS[point["ablation"]]
        distillation = ablation.get("distillation", point["distillation"])
        teacher = self.add_teacher(point) if distillation else None
        if point["optimiser"] == "real":
            self.add_final(point, "real", distillation, {"teacher_checkpoint": teacher} if teacher else {})
            return
        inputs = {"teacher_checkpoint": teacher} if teacher else {}
        if point["ablation"] != "no_pretrain":
            inputs["init_checkpoint"] = self.add_pretrain(point, distillation, inputs.copy())
        self.add_final(point, "quantise", distillation, inputs)

    def settings(self, phase: str, point: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
        """base < phases.<phase> < datasets.<dataset> < the point's axes < layers, then debug caps."""
        dataset = point["dataset"]
        merged = deep_merge(
            self.spec.base,
            getattr(self.spec.phases, phase),
            {"data": {**self.spec.datasets.get(dataset, {}), "name": dataset}},
            {"phase": phase, "seed": point["seed"], **self.spec.checkpoint.trainer_fields()},
            *layers,
        )
        if self.max_epochs is not None:
            merged["epochs"] = min(merged.get("epochs", TrialConfig.model_fields["epochs"].default), self.max_epochs)
            optimiser = merged.get("optimiser")
            if optimiser and "freeze_epochs" in OPTIMISER_MODELS[optimiser["name"]].model_fields:
                # A capped run still needs an epoch to train before the freeze (unset scales itself).
                freeze = optimiser.get("freeze_epochs")
                if freeze is not None or merged["epochs"] == 1:
                    optimiser["freeze_epochs"] = min(freeze or 0, merged["epochs"] - 1)
        if self.max_batches is not None:
            merged["max_batches"] = self.max_batches
        if dataset in ROOTED_DATASETS:  # absolute: Ray runs trials in their own working dirs
            merged["data"]["root"] = str(data_dir() / Path(merged["data"].get("root") or "data").expanduser())
        return merged

    def add_teacher(self, point: dict[str, Any]) -> str:
        identity = ("teacher", point["dataset"], point["seed"])
        if identity not in self.prerequisites:
            config = self.settings("teacher", point)
            role = self.role("teacher", point, "teacher", "baseline", False, config, prerequisite=True)
            self.prerequisites[identity] = self.add("teacher", config, {}, role)
        return self.prerequisites[identity]

    def add_pretrain(self, point: dict[str, Any], distillation: bool, inputs: dict[str, str]) -> str:
        ablation = ABLATIONS[point["ablation"]]
        # Optimiser-only ablations (regularisers, no_pretrain) share the baseline network's pretrain.
        variant = point["ablation"] if ("model" in ablation or "distillation" in ablation) else "baseline"
        identity = ("pretrain", point["dataset"], point["seed"], variant, distillation, tuple(sorted(inputs.items())))
        if identity not in self.prerequisites:
            config = self.settings("pretrain", point, {"model": ablation.get("model", {}), "distillation": distillation})
            role = self.role("pretrain", point, "pretrain", variant, distillation, config, prerequisite=True)
            self.prerequisites[identity] = self.add("pretrain", config, inputs, role)
        return self.prerequisites[identity]

    def add_final(self, point: dict[str, Any], phase: str, distillation: bool, inputs: dict[str, str]) -> str:
        ablation = ABLATIONS[point["ablation"]]
        optimiser = point["optimiser"]
        params = nest({key: point[key] for key in self.spec.axes.params if key in point})
        layers: list[dict[str, Any]] = [{"epochs": point["budget"], "distillation": distillation}]
        if phase == "quantise":
            optimiser_settings = {"name": optimiser, **self.spec.optimisers.get(optimiser, {})}
            # The ablation's optimiser change (regulariser) wins over the per-optimiser settings.
            optimiser_settings.update(ablation.get("optimiser", {}))
            layers.append({"optimiser": optimiser_settings, "model": ablation.get("model", {})})
        layers.append(params)
        config = self.settings(phase, point, *layers)
        role = self.role(phase, point, optimiser, point["ablation"], distillation, config, prerequisite=False)
        return self.add(phase, config, inputs, role)

    def role(
        self, phase: str, point: dict[str, Any], method: str, ablation: str, distillation: bool,
        config: dict[str, Any], prerequisite: bool,
    ) -> Role:
        """Run name and tags; axes that vary in the grid (other than optimiser, ablation, seed)
        become name segments so names stay readable (`table2/bnew/no_prelu/seed3`)."""
        segments = {
            "dataset": point["dataset"],
            "budget": f"budget{point['budget']}",
            "distillation": "distill" if distillation else "nodistill",
        }
        segments.update({key: f"{key.rpartition('.')[2]}={point[key]}" for key in self.spec.axes.params if key in point})
        shown = [axis for axis in segments if axis in self.varying]
        if prerequisite:  # prerequisites do not depend on the budget or the final stage's params
            own_axes = ("dataset",) if phase == "teacher" else ("dataset", "distillation")
            shown = [axis for axis in shown if axis in own_axes]
        parts = [self.spec.grid_label, method, ablation, *(segments[axis] for axis in shown), f"seed{point['seed']}"]
        axes = {
            "grid": self.spec.grid_label,
            "stage": phase,
            "dataset": point["dataset"],
            "optimiser": method,
            "ablation": ablation,
            "seed": str(point["seed"]),
            "budget": str(config.get("epochs", TrialConfig.model_fields["epochs"].default)),
            "distillation": tag_value("distillation", distillation),
        }
        if not prerequisite:
            axes.update({key: str(point[key]) for key in self.spec.axes.params if key in point})
        tags = {axis_tag(axis): value for axis, value in axes.items()}
        name = "/".join(parts)
        if name in self.names and not prerequisite:
            # Two points differ only in an axis the name left out: spell every axis out.
            name = "/".join([*parts[:3], *segments.values(), parts[-1]])
        return Role(name=name, tags=tags)

    def add(self, phase: str, settings: dict[str, Any], inputs: dict[str, str], role: Role) -> str:
        built = new_stage(phase, settings, inputs, f"{self.source} ({role.name})")
        stage = self.stages.setdefault(built.key, built)
        if not stage.roles or (phase in FINAL_PHASES and role.name not in {r.name for r in stage.roles}):
            stage.roles.append(role)
            self.names[role.name] = built.key
        return built.key


def new_stage(phase: Phase, settings: dict[str, Any], inputs: dict[str, str], source: str) -> Stage:
    """The stage (no roles yet) that trains `settings` (TrialConfig YAML) from `inputs`: validated,
    stored without its run-specific fields, keyed by its content. Raises `BnewError` naming `source`."""
    placeholders = {field_name: f"inputs/{field_name}/model.pt" for field_name in inputs}
    config = build_trial_config({**settings, **placeholders}, source)
    stored = config.model_dump(mode="json", exclude=set(RUN_SPECIFIC_FIELDS))
    return Stage(key=stage_key(stored, inputs), phase=phase, config=stored, inputs=dict(inputs))


def missing_data(plan: Plan) -> list[str]:
    """One line per dataset root the plan reads that is not a folder on this machine, naming
    `datasets.<name>.root` (relative roots are read from `BNEW_DATA_DIR`)."""
    missing = {}
    for stage in plan.stages.values():
        data = stage.config["data"]
        if data["name"] not in ROOTED_DATASETS or data["download"]:
            continue
        root = Path(data["root"])
        needed = [root / "train", root / "test"] if data["name"] == "imagefolder" else [root]
        for path in needed:
            if not path.is_dir():
                missing.setdefault(data["name"], f"datasets.{data['name']}.root: {path} is not a directory "
                                                  f"(relative roots are read from BNEW_DATA_DIR, here {data_dir()})")
    return list(missing.values())


def build_plan(
    spec: SweepSpec, source: str = "spec", max_epochs: int | None = None, max_batches: int | None = None,
    points: list[dict[str, Any]] | None = None,
) -> Plan:
    """Every stage of the sweep. Raises `BnewError` naming the key of the first impossible trial.

    `max_epochs`/`max_batches` cap every stage for dry runs (their keys differ from full runs);
    `points`: the spec's `grid_points`, if the caller has them already."""
    builder = PlanBuilder(spec, source, max_epochs, max_batches)
    points = grid_points(spec) if points is None else points
    if not points:
        raise BnewError(f"{source}: exclude: removes every point of the grid (no trials left)")
    for point in points:
        builder.add_point(point)
    return Plan(spec=spec, stages=builder.stages, max_epochs=max_epochs, max_batches=max_batches)
