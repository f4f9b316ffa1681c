"""`python -m bench` end to end in a tiny mode: both trainers run, the table has both rows and a
positive ratio (no timing assertions: the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.__main__ import main, preset_trial_epochs


def image_tree(root: Path, per_class: dict[str, int]) -> None:
    """A small ImageFolder tree of 32x32 JPEGs, two classes per split."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label in ("cats", "dogs"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:04d}.jpg")


@pytest.mark.long  # ~3-4 min on 2 cores
def test_bench_tiny_run_reports_both_trainers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("BNEW_CACHE_DIR", str(tmp_path / "cache"))
    image_tree(tmp_path / "data", {"train": 160, "test": 20})
    out = tmp_path / "bench.json"
    report = main(["--data", str(tmp_path / "data"), "--max-batches", "2", "--repeats", "1", "--val-size", "32",
                   "--device", "cpu", "--json", str(out), "--scratch", str(tmp_path / "runs"),
                   "--no-compile", "--concurrent", "1,2"])  # compiling is tested in test_train; here it would only cost time
    printed = capsys.readouterr().out
    assert "baseline" in printed and "fast" in printed and "paper-table1" in printed
    saved = json.loads(out.read_text())
    for kind in ("baseline", "fast"):
        assert saved[kind]["images_per_second"] > 0 and saved[kind]["peak_rss_mb"] > 0
        assert saved[kind]["runs"][0]["train_images"] == 2 * 128
        assert saved[kind]["runs"][0]["first_epoch_seconds"] > 0  # epoch 1 of 2 timed apart from epoch 2
    assert saved["ratio"]["epoch_seconds"] > 0 and report["ratio"]["images_per_second"] > 0
    assert saved["train_images_full_epoch"] == 2 * 128  # (320 - 32) // 128 full batches
    assert set(saved["concurrent"]) == {"1", "2"} and all(rate > 0 for rate in saved["concurrent"].values())
    assert "concurrent trials" in printed


def test_preset_trial_epochs_match_the_sweep_plans() -> None:
    assert preset_trial_epochs() == {"paper-table1": 51_000, "paper-table2": 33_000, "paper-main": 102_000}


def test_decode_bench_times_both_decoders_on_the_same_pixels(tmp_path: Path) -> None:
    from bench.decode import main as decode_main

    image_tree(tmp_path / "data", {"train": 10})
    table = decode_main(["--data", str(tmp_path / "data"), "--repeats", "2"])  # exits if their pixels differ
    lines = table.splitlines()
    assert lines[0] == "20 JPEGs, 2 repeats"
    assert lines[2].startswith("torchvision.io ") and "(before)" in lines[2]
    assert lines[3].startswith("torchcodec ") and "(after)" in lines[3]
    assert lines[4].startswith("after / before: ")
