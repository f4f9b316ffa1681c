"""Weight methods: how each phase and optimiser moves (and binarises) the weights.

Every method has one interface, called by the training loop in this order:

    method.start_epoch(e)
    for each batch:
        method.before_forward()      # e.g. STE swaps sign(w) in for the latent w
        loss.backward()
        method.after_backward()      # swap the latent weights back
        method.step()                # optimiser steps, then projections / proximal steps
    method.end_epoch(e)              # flip statistics

A method is a small class that overrides a few of these pieces; binary weights are updated
with tensor-wide `torch._foreach_*` ops over all of them at once.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .binarise import ScaledSignProjection, SignProjection, binary_sign
from .config import BmdConfig, BnewConfig, BopConfig, SteConfig, TrialConfig


def clamp_unit_(weights: list[torch.Tensor]) -> None:
    """Clamp every tensor to [-1, 1] in place."""
    torch._foreach_clamp_min_(weights, -1.0)
    torch._foreach_clamp_max_(weights, 1.0)


class WeightMethod:
    """Base: Adam over every parameter, a learning-rate schedule, an optional final freeze."""

    freeze_epochs = 0

    def __init__(self, model: nn.Module, config: TrialConfig, steps_per_epoch: int) -> None:
        self.config = config
        self.binary: list[nn.Parameter] = model.binary_weights()
        binary_ids = {id(weight) for weight in self.binary}
        self.floats = [p for p in model.parameters() if id(p) not in binary_ids]
        self.projection = ScaledSignProjection() if config.model.weight_scaling else SignProjection()
        self.device = next(model.parameters()).device
        self.steps_per_epoch = steps_per_epoch
        self.step_count = 0
        self.epoch = 0
        self.frozen = False
        self.latent = [torch.empty_like(weight) for weight in self.binary]
        self.swapped = False
        self.prepare_weights()
        self.optimizers = self.build_optimizers()
        self.previous_signs = [weight.detach() >= 0 for weight in self.soft_weights()]

    # -- pieces a method overrides -------------------------------------------------------
    def prepare_weights(self) -> None:
        """Change the starting weights before the optimisers are built (BOP starts from signs)."""

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.adam(self.binary + self.floats)]

    def forward_weights(self) -> list[torch.Tensor] | None:
        """Weights the training forward pass uses instead of the latent ones (None: the latent)."""
        return None

    def soft_weights(self) -> list[torch.Tensor]:
        """The real-valued weights that are being driven to binary (for distance and flip stats)."""
        return self.binary

    def step_binary(self, lr_factor: float) -> None:
        """Update binary weights outside the optimisers (BOP)."""

    def after_step(self) -> None:
        """Projection or proximal step after the optimisers moved (clamp, BNEW's prox)."""

    def extra_metrics(self) -> dict[str, float]:
        return {"lambda": 0.0}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- the interface the loop calls -------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.freeze_epochs and not self.frozen and epoch >= self.config.epochs - self.freeze_epochs:
            self.freeze()

    def before_forward(self) -> None:
        replacement = None if self.frozen else self.forward_weights()
        if replacement is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.latent, self.binary)
                torch._foreach_copy_(self.binary, replacement)
            self.swapped = True

    def after_backward(self) -> None:
        if self.swapped:
            # The gradient computed at the replacement is applied to the latent weights as is:
            # the straight-through step for STE, the mirror step for BMD.
            with torch.no_grad():
                torch._foreach_copy_(self.binary, self.latent)
            self.swapped = False

    def step(self) -> None:
        factor = self.lr_factor()
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.config.lr * factor
        with torch.no_grad():
            self.step_binary(factor)
        for optimizer in self.optimizers:
            optimizer.step()
        with torch.no_grad():
            self.after_step()
        for parameter in self.binary + self.floats:
            parameter.grad = None
        self.step_count += 1

    def end_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        """Per-epoch statistics of the binary weights, as device tensors (read once, later)."""
        if not self.binary:
            zero = torch.zeros((), device=self.device)
            return {"dist_to_binary": zero, "flip_fraction": zero}
        with torch.no_grad():
            soft = self.soft_weights()
            signs = [weight >= 0 for weight in soft]
            total = sum(weight.numel() for weight in soft)
            flipped = sum((now != before).sum() for now, before in zip(signs, self.previous_signs))
            distance = sum((weight - self.projection(weight)).abs().sum() for weight in soft)
        self.previous_signs = signs
        return {"dist_to_binary": distance / total, "flip_fraction": flipped / total}

    # -- shared machinery ----------------------------------------------------------------
    def lr_factor(self) -> float:
        """Multiplier of the initial lr at the current step."""
        schedule, epochs = self.config.lr_schedule, self.config.epochs
        if schedule == "linear":
            return max(0.0, 1.0 - self.step_count / (self.steps_per_epoch * epochs))
        if schedule == "step":
            return 0.1 ** sum(self.epoch >= milestone for milestone in (epochs // 2, epochs * 3 // 4))
        return 1.0

    def adam(self, parameters: list[nn.Parameter]) -> torch.optim.Adam:
        fused = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.Adam(parameters, lr=self.config.lr, weight_decay=self.config.weight_decay, **fused)

    def freeze(self) -> None:
        """Set the binary weights to their projections and stop training them."""
        with torch.no_grad():
            torch._foreach_copy_(self.binary, [self.projection(weight) for weight in self.soft_weights()])
        for weight in self.binary:
            weight.requires_grad_(False)
            weight.grad = None
        self.frozen = True

    @contextmanager
    def training_view(self) -> Iterator[None]:
        """The network as the training forward pass sees it (the 'float' network)."""
        self.before_forward()
        try:
            yield
        finally:
            self.after_backward()

    def final_weights(self) -> contextlib.AbstractContextManager[None]:
        """The weights a finished trial saves: binarised, except after pretraining."""
        return self.binarised()

    @contextmanager
    def binarised(self) -> Iterator[None]:
        """The fully binarised network: binary weights replaced by their projections."""
        if not self.binary:  # real-valued networks: nothing to binarise
            yield
            return
        with torch.no_grad():
            saved = [weight.clone() for weight in self.binary]
            torch._foreach_copy_(self.binary, [self.projection(weight) for weight in self.soft_weights()])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.binary, saved)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "step_count": self.step_count,
            "previous_signs": self.previous_signs,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        self.step_count = state["step_count"]
        self.previous_signs = [signs.to(self.device) for signs in state["previous_signs"]]
        self.load_extra_state(state["extra"])


class RealValued(WeightMethod):
    """Real-valued ResNet-20 (the paper's real-valued row): Adam, nothing binary."""


class Teacher(WeightMethod):
    """Real-valued WRN-22-1 teacher: SGD with Nesterov momentum 0.9 and weight decay."""

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.floats, lr=self.config.lr, momentum=0.9, nesterov=True,
                                weight_decay=self.config.weight_decay)]


class Pretrain(WeightMethod):
    """Phase 1: binary activations, float weights clamped to [-1, 1] after every step."""

    def after_step(self) -> None:
        # Only the weights phase 2 binarises are clamped: their scale must match +-1.
        clamp_unit_(self.binary)

    def final_weights(self) -> contextlib.AbstractContextManager[None]:
        # Phase 2 starts from the float weights, so they are saved as they are.
        return contextlib.nullcontext()


class STE(WeightMethod):
    """Straight-through estimator: forward at sign(w), Adam step on latent w, clamp to [-1, 1]."""

    def __init__(self, model: nn.Module, config: TrialConfig, steps_per_epoch: int) -> None:
        self.settings: SteConfig = config.optimiser
        super().__init__(model, config, steps_per_epoch)

    def forward_weights(self) -> list[torch.Tensor]:
        return [self.projection(weight) for weight in self.binary]

    def after_backward(self) -> None:
        super().after_backward()
        if self.settings.cancel_large_gradients:
            for weight in self.binary:
                if weight.grad is not None:
                    weight.grad.mul_(weight.abs() < 1)

    def after_step(self) -> None:
        clamp_unit_(self.binary)


BMD_K_MAX = 1e35
"""Cap of BMD's tanh slope k (the authors' value); float32 overflows at ~3.4e38."""


class BMD(WeightMethod):
    """Binary mirror descent: forward at tanh(k w), gradient applied to w, k = k0 ** epoch."""

    def __init__(self, model: nn.Module, config: TrialConfig, steps_per_epoch: int) -> None:
        self.settings: BmdConfig = config.optimiser
        self.freeze_epochs = self.settings.freeze_epochs
        self.k0 = self.settings.k0 or (1.01 if config.epochs >= 1000 else 1.3)
        super().__init__(model, config, steps_per_epoch)

    @property
    def k(self) -> float:
        """k0 ** epoch, capped at K_MAX (as the authors do): past it float32 k is inf and tanh(0 * inf) NaN."""
        return math.exp(min(self.epoch * math.log(self.k0), math.log(BMD_K_MAX)))

    def forward_weights(self) -> list[torch.Tensor]:
        return self.soft_weights()

    def soft_weights(self) -> list[torch.Tensor]:
        return [torch.tanh(self.k * weight) for weight in self.binary]

    def extra_metrics(self) -> dict[str, float]:
        return {"lambda": 0.0, "bmd_k": self.k}


class BOP(WeightMethod):
    """Bop: binary weights flip when the gradient momentum passes tau and agrees with the sign.

    m <- (1 - gamma) m + gamma g; flip w where |m| > tau and sign(m) == sign(w). gamma decays
    linearly with the lr schedule; float parameters use their own Adam.
    """

    def __init__(self, model: nn.Module, config: TrialConfig, steps_per_epoch: int) -> None:
        self.settings: BopConfig = config.optimiser
        super().__init__(model, config, steps_per_epoch)
        self.momentum = [torch.zeros_like(weight) for weight in self.binary]

    def prepare_weights(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.binary, [self.projection(weight) for weight in self.binary])

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.adam(self.floats)]

    def step_binary(self, lr_factor: float) -> None:
        gamma = self.settings.gamma * lr_factor
        torch._foreach_lerp_(self.momentum, [weight.grad for weight in self.binary], gamma)
        for weight, momentum in zip(self.binary, self.momentum):
            flip = (momentum.abs() > self.settings.tau) & ((momentum >= 0) == (weight >= 0))
            weight.mul_(1 - 2 * flip.to(weight.dtype))

    def extra_metrics(self) -> dict[str, float]:
        return {"lambda": 0.0, "bop_gamma": self.settings.gamma * self.lr_factor()}

    def extra_state(self) -> dict[str, Any]:
        return {"momentum": self.momentum}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.momentum = [momentum.to(self.device) for momentum in state["momentum"]]


class ConcaveRegulariser:
    """R(w) = -w^2 on [-1, 1]: prox is w <- clamp(w + 2 c w, -1, 1)."""

    def prox(self, weights: list[torch.Tensor], c: float) -> None:
        torch._foreach_mul_(weights, 1 + 2 * c)
        clamp_unit_(weights)


class L1Regulariser:
    """R_l1: w <- clamp(w + c sign(w), -1, 1)."""

    def prox(self, weights: list[torch.Tensor], c: float) -> None:
        torch._foreach_add_(weights, [binary_sign(weight) for weight in weights], alpha=c)
        clamp_unit_(weights)


class L2Regulariser:
    """R_l2: w <- clamp((w + c sign(w)) / (1 + c), -1, 1).

    The prox alone keeps |w| <= 1 only for weights already inside; the Adam step before it can
    push a weight past +-1, and without the clamp (the authors' code has it) it would drift."""

    def prox(self, weights: list[torch.Tensor], c: float) -> None:
        torch._foreach_add_(weights, [binary_sign(weight) for weight in weights], alpha=c)
        torch._foreach_div_(weights, 1 + c)
        clamp_unit_(weights)


REGULARISERS = {"concave": ConcaveRegulariser, "l1": L1Regulariser, "l2": L2Regulariser}


class BNEW(WeightMethod):
    """BNEW: Adam on the weights themselves, then the regulariser's proximal step.

    The prox step comes just after the Adam step (as in the authors' ImageNet code), so the
    clamp keeps every weight inside [-1, 1] at each forward pass. The per-step factor grows
    linearly over the phase: c_e = lr0 * lambda_rate * (e + 1) / E.
    """

    def __init__(self, model: nn.Module, config: TrialConfig, steps_per_epoch: int) -> None:
        self.settings: BnewConfig = config.optimiser
        self.freeze_epochs = self.settings.freeze_epochs
        self.regulariser = REGULARISERS[self.settings.regulariser]()
        super().__init__(model, config, steps_per_epoch)

    def lambda_now(self) -> float:
        return self.settings.lambda_rate * (self.epoch + 1) / self.config.epochs

    def after_step(self) -> None:
        if not self.frozen:
            self.regulariser.prox(self.binary, self.config.lr * self.lambda_now())

    def extra_metrics(self) -> dict[str, float]:
        return {"lambda": self.lambda_now()}


QUANTISERS: dict[str, type[WeightMethod]] = {"ste": STE, "bmd": BMD, "bop": BOP, "bnew": BNEW}
PHASES: dict[str, type[WeightMethod]] = {"teacher": Teacher, "pretrain": Pretrain, "real": RealValued}


def build_method(model: nn.Module, config: TrialConfig, steps_per_epoch: int) -> WeightMethod:
    """The weight method of a trial: its optimiser for the quantise phase, else its phase."""
    method_class = QUANTISERS[config.optimiser.name] if config.optimiser is not None else PHASES[config.phase]
    return method_class(model, config, steps_per_epoch)
