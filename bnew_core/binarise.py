"""Binarisation pieces: activation sign estimators and weight projections.

An estimator decides the gradient of sign() for activations; a projection maps latent
weights to the binary weights the network is evaluated with. Optimisers (optimisers.py)
decide how latent weights move; the three are independent and composable.
"""

from __future__ import annotations

import torch
from torch import nn


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1, so binary values are exactly +-1 (torch.sign(0) is 0)."""
    # 2*(x >= 0) - 1: exact, and ~3x faster on the CPU than torch.where with scalar operands.
    return (x >= 0).to(x.dtype).mul_(2).sub_(1)


class ApproxSign(torch.autograd.Function):
    """ReActNet / Bi-Real estimator: d sign(x)/dx ~ 2 - 2|x| on |x| < 1, else 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return x.abs().mul_(-2).add_(2).clamp_min_(0).mul_(grad)  # (2 - 2|x|)+ * grad, in place


class StraightThroughSign(torch.autograd.Function):
    """Classic STE: d sign(x)/dx ~ 1 on |x| <= 1, else 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


ESTIMATORS = {"approx_sign": ApproxSign, "ste": StraightThroughSign}


class SignActivation(nn.Module):
    """Binary activation: forward sign(x), backward by the chosen estimator."""

    def __init__(self, estimator: str) -> None:
        super().__init__()
        self.estimator = estimator
        self.function = ESTIMATORS[estimator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x)

    def extra_repr(self) -> str:
        return self.estimator


class SignProjection:
    """Binary weights as plain signs, +-1 (the paper's baselines)."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return binary_sign(weight)


class ScaledSignProjection:
    """Binary weights as alpha * sign(w), alpha = mean |w| per output filter (XNOR-Net style)."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        alpha = weight.abs().mean(dim=tuple(range(1, weight.dim())), keepdim=True)
        return alpha * binary_sign(weight)


WeightProjection = SignProjection | ScaledSignProjection
