"""Fixes from a line-by-line read of the trainer against the authors' code: each test fails
without its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnew_core.config import DataConfig, ModelConfig
from bnew_core.data import BatchLoader, load_data
from bnew_core.models import build_model
from bnew_core.optimisers import BMD, BMD_K_MAX, BNEW, L2Regulariser
from bnew_core.train import accuracy
from tests.test_data import write_tree
from tests.test_optimisers import Tiny, backward_linear, quantise_config


def test_l2_prox_clamps_to_the_unit_interval() -> None:
    weights = [torch.tensor([1.3, -2.0, 0.5, -0.2])]
    L2Regulariser().prox(weights, 0.1)
    expected = torch.tensor([1.0, -1.0, 0.6 / 1.1, -0.3 / 1.1])  # (w + c sign w) / (1 + c), clamped
    assert torch.allclose(weights[0], expected)


def test_bnew_l2_weights_stay_in_the_unit_interval_over_many_steps() -> None:
    config = quantise_config(epochs=10, name="bnew", regulariser="l2", lambda_rate=1.0, freeze_epochs=0)
    model = Tiny([0.95, -0.95, 0.1])
    method = BNEW(model, config, steps_per_epoch=50)
    for epoch in range(10):
        method.start_epoch(epoch)
        for _ in range(50):  # a constant gradient drives the first two weights outwards with Adam
            method.before_forward()
            backward_linear(model, [-1.0, 1.0, 0.0])
            method.after_backward()
            method.step()
    assert model.weight.detach().abs().max() <= 1.0


def test_bmd_k_is_capped_so_long_budgets_give_no_nan() -> None:
    config = quantise_config(epochs=1000, name="bmd", k0=1.3, freeze_epochs=0)
    model = Tiny([0.0, 0.5, -1e-30])
    method = BMD(model, config, steps_per_epoch=1)
    method.start_epoch(400)  # 1.3 ** 400 ~ 1e45: inf in float32, and tanh(0 * inf) is NaN
    assert method.k == pytest.approx(BMD_K_MAX)
    soft = method.soft_weights()[0]
    assert not torch.isnan(soft).any()
    assert torch.equal(soft.flatten(), torch.tensor([0.0, 1.0, -1.0]))
    method.start_epoch(3000)  # 1.3 ** 3000 overflows even a Python float
    assert method.extra_metrics()["bmd_k"] == pytest.approx(BMD_K_MAX)
    method.start_epoch(5)
    assert method.k == pytest.approx(1.3 ** 5)


def test_evaluation_is_float32_inside_bf16_autocast() -> None:
    """The training loop's bf16 autocast (CUDA) must not reach the reported accuracies; CPU
    autocast to bf16 stands in for it here."""
    data = load_data(DataConfig(name="synthetic", synthetic_size=200))
    loader = BatchLoader(data.train, data, DataConfig(name="synthetic"), 50, seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), data.in_channels, data.num_classes)
    logits_dtypes: list[torch.dtype] = []
    model.classifier.register_forward_hook(lambda module, inputs, output: logits_dtypes.append(output.dtype))
    reference = accuracy(model, data.test, loader, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.classifier(torch.zeros(1, model.classifier.in_features)).dtype == torch.bfloat16
        logits_dtypes.clear()
        inside = accuracy(model, data.test, loader, 64)
    assert logits_dtypes and set(logits_dtypes) == {torch.float32}
    assert torch.equal(inside, reference)


def test_limits_draw_random_images_not_the_first_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image trees list their images class by class: the first N would be one class."""
    monkeypatch.setenv("BNEW_CACHE_DIR", str(tmp_path / "cache"))
    write_tree(tmp_path / "tree", classes=3, per_class=8)
    data = load_data(DataConfig(name="imagefolder", root=tmp_path / "tree", train_limit=8, test_limit=6))
    assert (len(data.train), len(data.test)) == (8, 6)
    assert len(data.train.labels.unique()) > 1 and len(data.test.labels.unique()) > 1
    again = load_data(DataConfig(name="imagefolder", root=tmp_path / "tree", train_limit=8, test_limit=6))
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.test.labels, data.test.labels)
