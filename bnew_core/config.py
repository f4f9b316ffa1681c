"""Trial configuration: one pydantic model per concern, YAML maps one-to-one onto them.

A `TrialConfig` describes one training run (one phase of one seed). Defaults follow
`METHOD.md`; fields left unset that depend on the phase (lr, schedule, architecture,
weight decay) are resolved by `TrialConfig` so a dumped config is always explicit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class BnewError(Exception):
    """A user-facing error: the message is one line naming the field or file at fault."""


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
"""The forms of `TrialConfig.device`; bnew_core.device resolves them in the trial's process."""

DatasetName = Literal["digits", "synthetic", "cifar10", "cifar100", "imagefolder"]


class DataConfig(StrictModel):
    """Which images to train on and how to augment them."""

    name: DatasetName = "digits"
    """`digits` ships with the package (no download); `synthetic` is a seeded toy set for
    tests; `cifar10`/`cifar100` go through torchvision; `imagefolder` reads `root/train/<class>`
    and `root/test/<class>` image trees (the shared CIFAR-10 JPEG data is one)."""
    root: Path | None = None
    """Dataset directory (torchvision root for CIFAR, the tree for `imagefolder`)."""
    download: bool = False
    """Let torchvision download CIFAR into `root` if it is missing."""
    val_size: int = Field(0, ge=0)
    """Training images held out as a validation split (METHOD.md: 5000 of CIFAR's 50k)."""
    split_seed: int = 0
    """Seed of the train/validation split; fixed across trials so every seed sees the same split."""
    train_limit: int | None = Field(None, gt=0)
    """Use a seeded random subset of N training images (after the split; seed `subset_seed("train")`) for quick runs."""
    test_limit: int | None = Field(None, gt=0)
    """Evaluate on a seeded random subset of N test images (seed `subset_seed("test")`): on short CPU
    runs the per-epoch evaluation otherwise costs as much as the training."""
    crop_padding: int | None = Field(None, ge=0)
    """Padding of the random crop; default 4 for 32x32 images, 1 for 8x8 digits."""
    flip: bool | None = None
    """Random horizontal flips; default on, except for digits (a flipped digit is another glyph)."""
    synthetic_size: int = Field(2000, gt=0)
    """Number of training images of the synthetic set (a quarter as many for test)."""

    def subset_seed(self, split: Literal["train", "test"]) -> int:
        """The seed of the `train_limit` / `test_limit` subset (reports name it beside their p-values)."""
        return self.split_seed + {"train": 1, "test": 2}[split]


class ModelConfig(StrictModel):
    """The network and one switch per ablation of Table 2."""

    arch: Literal["resnet20", "wrn22_1"] | None = None
    """`resnet20` is the ReActNet-style binary ResNet-20; `wrn22_1` the real-valued teacher.
    Default: `wrn22_1` for the teacher phase, `resnet20` otherwise."""
    real_valued: bool = False
    """ResNet-20 with float weights and float activations (the paper's real-valued row)."""
    learnable_bias: bool = True
    """RSign/RPReLU-style learnable per-channel bias layers around sign and PReLU."""
    activation: Literal["prelu", "relu"] = "prelu"
    """Block activation after the residual addition."""
    scale: bool = True
    """Learnable per-channel scale after each binary conv (the paper's parameter scaling)."""
    estimator: Literal["approx_sign", "ste"] = "approx_sign"
    """Activation-sign gradient: ReActNet's piecewise quadratic (2-2|x|) or classic STE (1 on |x|<=1)."""
    binary_first_last: bool = False
    """Also binarise the weights of the stem conv and of the classifier."""
    binary_bottleneck: bool = False
    """Also binarise the weights of the 1x1 shortcut convs."""
    weight_scaling: bool = False
    """Project binary weights to alpha*sign(w) with alpha = mean|w| per output filter."""


class SteConfig(StrictModel):
    """Straight-through estimator on latent weights clamped to [-1, 1]."""

    name: Literal["ste"] = "ste"
    cancel_large_gradients: bool = False
    """Zero the gradient of latent weights with |w| >= 1 (the authors' code does not)."""


class BmdConfig(StrictModel):
    """Binary mirror descent: forward with tanh(k*w), mirror step on w, k = k0**epoch."""

    name: Literal["bmd"] = "bmd"
    k0: float | None = Field(None, gt=1.0)
    """Growth of the tanh slope per epoch. Default 1.01 for budgets of 1000 epochs or more,
    1.3 for shorter ones (as in the authors' scripts)."""
    freeze_epochs: int | None = Field(None, ge=0)
    """The last N epochs train with the binary weights frozen at their signs. Default 19 (the
    authors' scripts), or a tenth of the epochs (at least 1) for budgets under 190 epochs."""


class BopConfig(StrictModel):
    """Binary optimiser (Helwegen et al. 2019): flip on a momentum threshold."""

    name: Literal["bop"] = "bop"
    gamma: float = Field(1e-4, gt=0, le=1)
    """Adaptivity rate of the momentum buffer, decayed linearly with the lr schedule."""
    tau: float = Field(1e-8, ge=0)
    """Flip threshold on |m|."""


class BnewConfig(StrictModel):
    """BNEW: proximal step of a concave regulariser pushing weights to +-1."""

    name: Literal["bnew"] = "bnew"
    lambda_rate: float = Field(0.01, ge=0)
    """Regularisation rate; per-step factor c_e = lr0 * lambda_rate * (e+1)/E."""
    regulariser: Literal["concave", "l1", "l2"] = "concave"
    """`concave` is R(w) = -w^2 (the paper); `l1` and `l2` are the R_l1 / R_l2 ablations."""
    freeze_epochs: int | None = Field(None, ge=0)
    """The last N epochs train with the binary weights frozen at their signs. Default 19 (the
    authors' scripts), or a tenth of the epochs (at least 1) for budgets under 190 epochs."""


OptimiserConfig = Annotated[
    Union[SteConfig, BmdConfig, BopConfig, BnewConfig], Field(discriminator="name")
]
OptimiserName = Literal["ste", "bmd", "bop", "bnew"]

Phase = Literal["teacher", "pretrain", "quantise", "real"]


class TrialConfig(StrictModel):
    """One training run: a phase of METHOD.md on one dataset with one seed."""

    name: str = "trial"
    """Readable name, used for output folders and run names."""
    phase: Phase = "quantise"
    """`teacher`: real-valued WRN-22-1; `pretrain`: binary activations, float weights clamped
    to [-1,1]; `quantise`: binarise the weights with `optimiser`; `real`: real-valued ResNet-20."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimiser: OptimiserConfig | None = None
    """How to binarise the weights; required for (and only for) the quantise phase."""
    epochs: int = Field(200, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float | None = Field(None, gt=0)
    """Initial learning rate. Default 0.1 (SGD) for the teacher, 0.01 (Adam) otherwise."""
    lr_schedule: Literal["linear", "step", "constant"] | None = None
    """`linear` decays to 0 per iteration; `step` divides by 10 at 50% and 75% of the epochs.
    Default `step` for the teacher, `linear` otherwise."""
    weight_decay: float | None = Field(None, ge=0)
    """Default 1e-4 for the teacher (SGD), 0 otherwise (Adam)."""
    distillation: bool = False
    """Train on the teacher's softmax instead of the labels."""
    teacher_checkpoint: Path | None = None
    """Checkpoint of a trained teacher (required with distillation)."""
    init_checkpoint: Path | None = None
    """Weights to start from (the pretrained model for the quantise phase); none = random init."""
    seed: int = 0
    device: str = "auto"
    """`auto` (CUDA if available), `cpu`, `cuda`, `cuda:1`, ..."""
    output_dir: Path = Path("runs/trial")
    """Where checkpoint.pt, model.pt, metrics.jsonl and config.yaml are written."""
    checkpoint_every: int = Field(1, gt=0)
    """Write a resumable checkpoint every N epochs (and always after the last)."""
    checkpoint_minutes: float | None = Field(None, gt=0)
    """Also write one when this many minutes have passed since the last (whichever comes first)."""
    max_batches: int | None = Field(None, gt=0)
    """Debug cap on training batches per epoch."""
    eval_batch_size: int = Field(1000, gt=0)
    channels_last: bool = True
    """Channels-last memory format on CUDA devices (faster convs there; measured slower on the CPU)."""
    bf16: bool = True
    """bfloat16 autocast on CUDA devices (ignored on the CPU)."""
    compile: bool | None = None
    """torch.compile the model and the teacher. `None` (default): compile when the trial runs at
    least 2,000 optimisation steps and a compiler is there (a C++ compiler on the CPU, Triton on
    CUDA); compiling takes about a minute cold (seconds from the on-disk cache) and made a step
    2.1x faster on a 2-core CPU, so it pays for real trials and not for smoke tests."""

    _device_choice: Any = PrivateAttr(None)  # a bnew_core.device.DeviceChoice; Any keeps torch out of here

    @property
    def device_choice(self) -> Any:
        """What `train` resolved `device` to in its process (a `bnew_core.device.DeviceChoice`):
        set on the copy of the config that the callbacks get, None elsewhere. Not a field, so it
        is never dumped, hashed into a stage key or written to a checkpoint."""
        return self._device_choice

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, device):
            raise ValueError(f"{device!r} is not a device (auto, cpu, cuda, cuda:N)")
        return device

    @model_validator(mode="after")
    def _resolve_phase_defaults(self) -> "TrialConfig":
        teacher = self.phase == "teacher"
        updates: dict[str, Any] = {}
        if self.lr is None:
            updates["lr"] = 0.1 if teacher else 0.01
        if self.lr_schedule is None:
            updates["lr_schedule"] = "step" if teacher else "linear"
        if self.weight_decay is None:
            updates["weight_decay"] = 1e-4 if teacher else 0.0
        # Written through __dict__: assignment would re-run this validator (validate_assignment).
        if self.model.arch is None:
            self.model.__dict__["arch"] = "wrn22_1" if teacher else "resnet20"
        for key, value in updates.items():
            self.__dict__[key] = value
        self._check_consistency()
        return self

    def _check_consistency(self) -> None:
        if self.phase == "quantise" and self.optimiser is None:
            raise ValueError("optimiser: required for the quantise phase (ste, bmd, bop or bnew)")
        if self.phase != "quantise" and self.optimiser is not None:
            raise ValueError(f"optimiser: only the quantise phase binarises weights, not {self.phase}")
        if self.phase == "teacher" and self.model.arch != "wrn22_1":
            raise ValueError("model.arch: the teacher phase trains the real-valued wrn22_1")
        if self.phase != "teacher" and self.model.arch == "wrn22_1":
            raise ValueError(f"model.arch: wrn22_1 is the teacher; phase {self.phase} needs resnet20")
        if self.phase == "real" and not self.model.real_valued:
            self.model.__dict__["real_valued"] = True
        if self.phase in ("pretrain", "quantise") and self.model.real_valued:
            raise ValueError(f"model.real_valued: phase {self.phase} trains a binary network")
        if self.phase == "teacher" and self.distillation:
            raise ValueError("distillation: the teacher is not distilled from another teacher")
        if getattr(self.optimiser, "freeze_epochs", 0) is None:
            self.optimiser.__dict__["freeze_epochs"] = 19 if self.epochs >= 190 else max(1, self.epochs // 10)
        freeze = getattr(self.optimiser, "freeze_epochs", 0)
        if freeze >= self.epochs:
            raise ValueError(
                f"optimiser.freeze_epochs: {freeze} frozen epochs leave none of the {self.epochs} to train"
            )

    @property
    def binary_optimiser(self) -> str:
        """The weight method's name: the optimiser, or the phase for non-quantise phases."""
        return self.optimiser.name if self.optimiser is not None else self.phase


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted field path and the source file."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"] if part != "")  # "": an untagged union member
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"].endswith("_type") and isinstance(problem.get("input"), (bool, int, float, str)):
            message += f", got {json.dumps(problem['input'])}"  # `true` for a boolean, as YAML spells it
        # Model-level validators name their field inside the message already.
        lines.append(f"{source}: {location}: {message}" if location else f"{source}: {message}")
    return "; ".join(lines)


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""PyYAML's safe loader, in C where libyaml is built in (a 25,000-seed axis loads in 0.1 s, not 1 s)."""


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    if not path.is_file():
        raise BnewError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise BnewError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BnewError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `data['a']['b'] = value` for `dotted_key='a.b'`, creating mappings on the way."""
    *parents, leaf = dotted_key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BnewError(f"{dotted_key}: {part} is not a mapping")
    node[leaf] = value


def build_trial_config(data: dict[str, Any], source: str = "config") -> TrialConfig:
    """Validate a config mapping, turning pydantic errors into a one-line `BnewError`."""
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as exc:
        raise BnewError(format_validation_error(exc, source)) from None


def load_trial_config(path: Path | None, overrides: dict[str, Any] | None = None) -> TrialConfig:
    """A `TrialConfig` from a YAML file (or defaults) with dotted-key overrides applied."""
    data = load_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return build_trial_config(data, str(path) if path is not None else "config")


def dump_trial_config(config: TrialConfig) -> str:
    """The resolved config as YAML that `load_trial_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
