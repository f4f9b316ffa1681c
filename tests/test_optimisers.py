"""Each weight method's update against its formula, on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnew_core.binarise import ApproxSign, ScaledSignProjection, StraightThroughSign, binary_sign
from bnew_core.config import TrialConfig
from bnew_core.optimisers import (BMD, BNEW, BOP, STE, ConcaveRegulariser, L1Regulariser, L2Regulariser,
                                  Pretrain, build_method)


class Tiny(nn.Module):
    """One binary weight tensor and one float tensor: enough to test a method's update."""

    def __init__(self, weight: list) -> None:
        super().__init__()
        weight = torch.tensor(weight)
        self.weight = nn.Parameter(weight.view(-1, 1) if weight.dim() == 1 else weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def binary_weights(self) -> list[nn.Parameter]:
        return [self.weight]


def quantise_config(epochs: int = 10, **optimiser) -> TrialConfig:
    return TrialConfig(phase="quantise", epochs=epochs, optimiser=optimiser, device="cpu")


def backward_linear(model: Tiny, coefficients: list[float]) -> None:
    """loss = sum(c_i * w_i) + bias: the gradient w.r.t. whatever the forward saw is exactly c."""
    loss = (torch.tensor(coefficients).view_as(model.weight) * model.weight).sum() + model.bias.sum()
    loss.backward()


def adam_first_step(weight: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """Adam's first update from zero state: w - lr * g / (|g| + eps) (bias corrections cancel)."""
    return weight - lr * grad / (grad.abs() + 1e-8)


def one_step(method, model: Tiny, coefficients: list[float]) -> None:
    method.before_forward()
    backward_linear(model, coefficients)
    method.after_backward()
    method.step()


def test_estimator_gradient_masks() -> None:
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0], requires_grad=True)
    ApproxSign.apply(x).sum().backward()
    expected = torch.tensor([0.0, 0.0, 1.0, 2.0, 1.5, 0.0, 0.0])  # 2 - 2|x| inside (-1, 1)
    assert torch.equal(x.grad, expected)
    x.grad = None
    out = StraightThroughSign.apply(x)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]))  # 1 on |x| <= 1


def test_scaled_projection_uses_mean_abs_per_filter() -> None:
    weight = torch.tensor([[0.5, -0.1], [-0.2, -0.4]])
    assert torch.allclose(ScaledSignProjection()(weight), torch.tensor([[0.3, -0.3], [-0.3, -0.3]]))


@pytest.mark.parametrize("c", [1e-4, 0.05])
def test_regulariser_prox_steps(c: float) -> None:
    w = torch.tensor([0.5, -0.2, 0.999, -0.0, 0.3])
    concave = [w.clone()]
    ConcaveRegulariser().prox(concave, c)
    assert torch.allclose(concave[0], (w + 2 * c * w).clamp(-1, 1))
    l1 = [w.clone()]
    L1Regulariser().prox(l1, c)
    assert torch.allclose(l1[0], (w + c * binary_sign(w)).clamp(-1, 1))
    l2 = [w.clone()]
    L2Regulariser().prox(l2, c)
    assert torch.allclose(l2[0], (w + c * binary_sign(w)) / (1 + c))


def test_bnew_step_is_adam_then_prox_with_linear_lambda() -> None:
    config = quantise_config(epochs=10, name="bnew", lambda_rate=0.5, freeze_epochs=2)
    model = Tiny([0.3, -0.6, 0.05])
    start = model.weight.detach().clone()
    method = BNEW(model, config, steps_per_epoch=4)
    method.start_epoch(3)
    method.step_count = 12  # first step of epoch 3
    one_step(method, model, [1.0, -2.0, 0.5])
    lr = 0.01 * (1 - 12 / 40)
    c = 0.01 * 0.5 * (3 + 1) / 10  # lr0 * lambda_rate * (e + 1) / E
    expected = (adam_first_step(start, torch.tensor([[1.0], [-2.0], [0.5]]), lr) * (1 + 2 * c)).clamp(-1, 1)
    assert torch.allclose(model.weight.detach(), expected, atol=1e-7)
    assert method.extra_metrics()["lambda"] == pytest.approx(0.5 * 4 / 10)


def test_lambda_and_lr_schedules_at_end_points() -> None:
    config = quantise_config(epochs=10, name="bnew", lambda_rate=0.01)
    method = BNEW(Tiny([0.1]), config, steps_per_epoch=5)
    method.start_epoch(0)
    assert method.lr_factor() == 1.0
    assert method.lambda_now() == pytest.approx(0.01 / 10)
    method.start_epoch(9)
    method.step_count = 49
    assert method.lambda_now() == pytest.approx(0.01)
    assert method.lr_factor() == pytest.approx(1 / 50)
    method.step_count = 50
    assert method.lr_factor() == 0.0
    teacher = build_method(Tiny([0.1]), TrialConfig(phase="real", epochs=8, lr_schedule="step"), 5)
    factors = []
    for epoch in (0, 3, 4, 5, 6, 7):
        teacher.start_epoch(epoch)
        factors.append(teacher.lr_factor())
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("optimiser", [{"name": "bnew", "freeze_epochs": 3}, {"name": "bmd", "freeze_epochs": 3}])
@pytest.mark.parametrize("scaled", [False, True])
def test_freeze_sets_exact_binary_weights_and_keeps_them(optimiser: dict, scaled: bool) -> None:
    config = quantise_config(epochs=10, **optimiser)
    config.model.weight_scaling = scaled
    model = Tiny([[0.3, -0.6], [0.05, -0.01]])  # two output filters
    method = build_method(model, config, steps_per_epoch=2)
    method.start_epoch(6)
    assert not method.frozen
    soft = torch.tensor([[0.3, -0.6], [0.05, -0.01]])
    if optimiser["name"] == "bmd":  # BMD's network sees tanh(k w), k = 1.3 ** epoch
        soft = torch.tanh(1.3 ** 7 * soft)
    method.start_epoch(7)  # E - freeze_epochs
    alpha = soft.abs().mean(1, keepdim=True) if scaled else torch.ones(2, 1)  # per output filter
    frozen = alpha * torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    assert torch.allclose(model.weight.detach(), frozen)
    assert not model.weight.requires_grad
    for _ in range(3):
        method.before_forward()
        (model.bias * 2).sum().backward()
        method.after_backward()
        method.step()
    assert torch.allclose(model.weight.detach(), frozen)
    assert model.bias.detach().item() != 0.0  # float parameters keep training


def test_bop_flip_rule_and_momentum() -> None:
    config = quantise_config(epochs=10, name="bop", gamma=0.5, tau=0.1)
    model = Tiny([0.7, 0.2, -0.4, -0.9, 0.3])
    method = BOP(model, config, steps_per_epoch=10)
    assert torch.equal(model.weight.detach().flatten(), torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0]))
    one_step(method, model, [1.0, -1.0, -1.0, 1.0, 0.1])
    # m = (1 - gamma) * 0 + gamma * g with gamma at lr factor 1: [0.5, -0.5, -0.5, 0.5, 0.05]
    assert torch.allclose(method.momentum[0].flatten(), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.05]))
    # flip where |m| > tau and sign(m) == sign(w): entries 0 and 2; entry 4 is below tau
    assert torch.equal(model.weight.detach().flatten(), torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0]))
    one_step(method, model, [0.0, 0.0, 0.0, 0.0, 0.0])
    gamma = 0.5 * (1 - 1 / 100)  # decayed linearly with the lr schedule
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.05]) * (1 - gamma)
    assert torch.allclose(method.momentum[0].flatten(), expected)
    assert all(id(p) != id(model.weight) for group in method.optimizers[0].param_groups for p in group["params"])


def test_bmd_forward_is_tanh_and_step_is_mirror() -> None:
    config = quantise_config(epochs=20, name="bmd", k0=1.5, freeze_epochs=0)
    model = Tiny([0.3, -0.6, 0.05])
    start = model.weight.detach().clone()
    method = BMD(model, config, steps_per_epoch=10)
    method.start_epoch(4)
    k = 1.5 ** 4
    method.before_forward()
    assert torch.allclose(model.weight.detach(), torch.tanh(k * start))
    backward_linear(model, [1.0, -2.0, 0.5])
    method.after_backward()
    assert torch.equal(model.weight.detach(), start)
    # gradient w.r.t. tanh(kw) applied to w directly: no k (1 - tanh^2) chain-rule factor
    assert torch.equal(model.weight.grad.flatten(), torch.tensor([1.0, -2.0, 0.5]))
    method.step()
    assert torch.allclose(model.weight.detach(), adam_first_step(start, torch.tensor([[1.0], [-2.0], [0.5]]), 0.01))
    assert method.extra_metrics()["bmd_k"] == pytest.approx(k)


@pytest.mark.parametrize("cancel", [False, True])
def test_ste_forward_sign_latent_update_and_clamp(cancel: bool) -> None:
    config = quantise_config(epochs=10, name="ste", cancel_large_gradients=cancel)
    model = Tiny([0.3, -0.6, 0.995, -1.0])
    start = model.weight.detach().clone()
    method = STE(model, config, steps_per_epoch=10)
    method.before_forward()
    assert torch.equal(model.weight.detach().flatten(), torch.tensor([1.0, -1.0, 1.0, -1.0]))
    backward_linear(model, [1.0, -2.0, -0.5, 3.0])
    method.after_backward()
    grad = torch.tensor([[1.0], [-2.0], [-0.5], [3.0]])
    if cancel:
        grad[3] = 0.0  # |w| >= 1
    assert torch.equal(model.weight.grad, grad)
    method.step()
    expected = adam_first_step(start, grad, 0.01).clamp(-1, 1)
    assert torch.allclose(model.weight.detach(), expected)
    assert model.weight.detach()[2].item() == 1.0  # pushed past 1 and clamped


def test_pretrain_clamps_binary_weights_only() -> None:
    model = Tiny([0.999, -0.5])
    method = Pretrain(model, TrialConfig(phase="pretrain", epochs=3, lr=0.5), steps_per_epoch=1)
    one_step(method, model, [-1.0, 1.0])
    assert model.weight.detach().flatten().tolist() == [1.0, pytest.approx(-1.0)]
    assert model.bias.item() == pytest.approx(-0.5)  # not clamped (lr 0.5, Adam's first step)


def test_binarised_view_restores_latent_weights() -> None:
    model = Tiny([0.3, -0.6])
    method = build_method(model, quantise_config(name="bnew"), steps_per_epoch=1)
    with method.binarised():
        assert model.weight.detach().flatten().tolist() == [1.0, -1.0]
    assert model.weight.detach().flatten().tolist() == pytest.approx([0.3, -0.6])


def test_flip_fraction_and_distance() -> None:
    model = Tiny([0.5, -0.5, 0.25, -1.0])
    method = build_method(model, quantise_config(name="bnew"), steps_per_epoch=1)
    with torch.no_grad():
        model.weight.mul_(torch.tensor([[-1.0], [1.0], [1.0], [1.0]]))
    stats = method.end_epoch(0)
    assert stats["flip_fraction"].item() == pytest.approx(1 / 4)
    assert stats["dist_to_binary"].item() == pytest.approx((0.5 + 0.5 + 0.75 + 0.0) / 4)
    assert math.isclose(method.end_epoch(1)["flip_fraction"].item(), 0.0)
