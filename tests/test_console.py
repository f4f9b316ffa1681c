"""The sweep console on a real local Ray: the demo (shortened) under a pseudo-terminal stays
within its line budget with no ERROR or traceback, and a sweep writing to a file prints plain
lines, one per finished or failed trial, the failure's reason included; `status` then shows
the failed trial's last log lines, and `resume --verbose` finishes it with Tune's reporter on
while `status --watch` follows it from MLflow until it ends. A SIGTERM that stops a trial's
process inside a finaliser prints nothing. A terminal frame renders to a PNG (`make images`
renders the demo's for the README)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from screens import plain, replay, run_in_pty, save_console_screenshot, sweep_env

LINE_BUDGET = 40


@pytest.mark.slow
def test_demo_under_a_terminal_is_a_compact_live_view(tmp_path: Path) -> None:
    code, chunks = run_in_pty(["sweep", "run", "demo", "--local", "--max-epochs", "1", "--max-batches", "2"], tmp_path)
    raw = b"".join(chunks).decode(errors="replace")
    assert code == 0, plain(raw)[-4000:]
    assert "ERROR" not in plain(raw) and "Traceback" not in plain(raw), plain(raw)[-4000:]

    terminal, best_frame = replay(chunks)
    printed = [line for line in terminal.lines() if line.strip()]
    assert len(printed) <= LINE_BUDGET, "\n".join(printed)
    assert sum(line.startswith("done   demo/") for line in printed) == 12, "\n".join(printed)
    assert any("sweep demo: 12 stages trained" in line for line in printed)
    assert best_frame and any(re.search(r"epoch \d/1 +binary", plain(line)) for line in best_frame), raw[-3000:]
    assert any(re.match(r"quantise +\d+ +\d+ +\d+ +\d+", plain(line).strip()) for line in best_frame)

    client = MlflowClient(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    for run in client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'trial'"):
        log = Path(client.download_artifacts(run.info.run_id, "logs/trial.log", str(tmp_path / run.info.run_id)))
        assert log.read_text().startswith("--- "), run.info.run_name


@pytest.mark.debian("chromium")
def test_a_console_frame_renders_to_a_png(tmp_path: Path) -> None:
    """What `make images` does with the demo's frame (docs/make_images.py)."""
    frame = ["\x1b[32mdone   demo/teacher/baseline/seed0  binary 91.4%  in 0m21s\x1b[0m",
             "demo/bnew/baseline/seed0  epoch 3/10  binary 88.2%  eta 0m12s", "\x1b[1msweep eta 0m40s\x1b[0m"]
    save_console_screenshot(frame, tmp_path / "console.png", title="bnew sweep run demo --local")
    assert (tmp_path / "console.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "console.png").stat().st_size > 5000


FAILING_SPEC = """\
name: plain
description: one pretrain and one STE trial that fails
axes:
  dataset: [digits]
  optimiser: [ste]
  seed: [0]
  budget: [1]
  distillation: [false]
base: {batch_size: 32, device: cpu}
phases:
  pretrain: {epochs: 1}
max_failures: 0
"""


@pytest.mark.slow
def test_output_to_a_file_is_plain_lines_with_the_failure_reason_and_its_log(tmp_path: Path) -> None:
    (tmp_path / "plain.yaml").write_text(FAILING_SPEC)
    env = {**sweep_env(), "BNEW_SWEEP_FAULT": "plain/ste/*@0"}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        code = subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "run", "plain.yaml", "--local",
                               "--max-batches", "2"], cwd=tmp_path, env=env, stdout=out, stderr=err,
                              timeout=600).returncode
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert code == 1, stdout + stderr
    assert "\x1b[" not in stdout + stderr
    assert "Traceback" not in stdout + stderr and "ERROR" not in stdout + stderr, stdout + stderr
    lines = stdout.splitlines()
    assert lines.count("start plain/pretrain/baseline/seed0 (pretrain, 1 epochs)") == 1, stdout
    assert sum(line.startswith("done   plain/pretrain/baseline/seed0  binary ") for line in lines) == 1, stdout
    assert ("FAILED plain/ste/baseline/seed0: RuntimeError: BNEW_SWEEP_FAULT: injected failure after epoch 0"
            in lines), stdout
    assert "Configuration for experiment" not in stdout  # Tune's own header stays off

    status = subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "status", "plain.yaml"], cwd=tmp_path,
                            env=sweep_env(), capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    assert "last lines of plain/ste/baseline/seed0's log (logs/trial.log):" in status.stdout
    assert "  | RuntimeError: BNEW_SWEEP_FAULT: injected failure after epoch 0" in status.stdout  # the log's tail

    from sweeps.analysis.report import failed_trials, render_failed_markdown
    from sweeps.records.sweep_runs import load_sweep

    report = render_failed_markdown(failed_trials(load_sweep(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}", "plain")))
    assert "- `plain/ste/baseline/seed0` (quantise): RuntimeError: BNEW_SWEEP_FAULT" in report
    assert "\n  RuntimeError: BNEW_SWEEP_FAULT: injected failure after epoch 0\n  ```" in report  # the log's tail, fenced

    # `resume --verbose` without the fault, watched from MLflow by `status --watch` while it runs.
    with open(tmp_path / "resume.txt", "w") as out:
        resume = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "sweep", "resume", "plain.yaml", "--local",
                                   "--max-batches", "2", "--verbose"], cwd=tmp_path, env=sweep_env(), stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while "resuming Tune experiment" not in (tmp_path / "resume.txt").read_text():  # its parent run is open
                assert resume.poll() is None and time.time() < deadline, (tmp_path / "resume.txt").read_text()
                time.sleep(0.5)
            watch = subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "status", "plain.yaml", "--watch",
                                    "--interval", "1"], cwd=tmp_path, env=sweep_env(), capture_output=True, text=True,
                                   timeout=600)
            assert resume.wait(timeout=300) == 0, (tmp_path / "resume.txt").read_text()
        finally:
            resume.kill()
    resumed = (tmp_path / "resume.txt").read_text()
    assert "Traceback" not in resumed and "FAILED" not in resumed, resumed
    lines = resumed.splitlines()
    assert "start plain/ste/baseline/seed0 (quantise, 1 epochs, from epoch 1)" in lines, resumed  # its checkpoint
    assert sum(line.startswith("done   plain/ste/baseline/seed0  ") for line in lines) == 1, resumed
    assert "Configuration for experiment" in resumed and "(tune_trial pid=" in resumed  # --verbose: Tune's, workers'
    assert watch.returncode == 0, watch.stdout + watch.stderr
    refreshes = [line for line in watch.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d pretrain 1/1; quantise ", line)]
    assert refreshes and "pretrain 1/1; quantise 1/1; sweep eta" in refreshes[-1], watch.stdout  # until it ended


def test_view_counts_stages_and_estimates_from_measured_epoch_times() -> None:
    from rich.console import Console

    from sweeps.ui.console import SweepConsole, SweepView
    from sweeps.core.plan import build_plan
    from sweeps.core.spec import load_spec

    plan = build_plan(load_spec("demo"), "demo", max_epochs=4)
    view = SweepView.of_stages(list(plan.stages.values()))
    teachers = [stage.key for stage in plan.of_phase("teacher")]
    view.start(teachers[0], now=100.0)
    view.epoch(teachers[0], epochs_done=1, accuracy=50.0, now=110.0)  # 10 s an epoch
    assert view.trial_eta(view.stages[teachers[0]], now=110.0) == 30.0
    # 47 epochs left (3 of this teacher, 4 of every other stage) at 10 s, on 1 running trial
    assert view.sweep_eta(now=110.0) == 470.0
    assert view.counts()["teacher"] == {"pending": 1, "running": 1, "done": 0, "failed": 0, "interrupted": 0, "stopped": 0}

    output = io.StringIO()  # not a terminal: plain lines
    shown = SweepConsole(view, console=Console(file=output, width=100))
    shown.finished(teachers[0])
    shown.failed(teachers[1], "RuntimeError: out of memory")
    lines = output.getvalue().splitlines()
    assert lines[0].startswith("done   demo/teacher/baseline/seed0  binary 50.0%")
    assert lines[1] == "FAILED demo/teacher/baseline/seed1: RuntimeError: out of memory"
    assert view.counts()["teacher"] == {"pending": 0, "running": 0, "done": 1, "failed": 1, "interrupted": 0, "stopped": 0}


SIGTERM_IN_A_FINALISER = """
import os, signal, sys
from sweeps.run.trial import quiet_sigterm_in_finalisers

def sigterm_handler(signum, frame):  # what Ray's worker installs
    raise SystemExit(1)

signal.signal(signal.SIGTERM, sigterm_handler)
if sys.argv[1] == "quiet":
    quiet_sigterm_in_finalisers()

class StoppedWhileCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        while True:  # the handler runs at the next bytecode, here, inside the finaliser
            pass

class BrokenFinaliser:
    def __del__(self):
        raise ValueError("a finaliser's own bug")

StoppedWhileCollected()
BrokenFinaliser()
print("went on", flush=True)
"""


@pytest.mark.parametrize("hook", ["quiet", "python's"])
def test_a_sigterm_inside_a_finaliser_prints_no_traceback_but_other_unraisables_still_show(hook: str) -> None:
    # Tune stops a finished trial's actor; when the SIGTERM lands in a weakref callback, `--verbose`
    # streamed "Exception ignored in ... SystemExit: 1" into a healthy sweep's console.
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_A_FINALISER, hook], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "went on\n", done.stdout + done.stderr  # dropped either way
    assert "ValueError: a finaliser's own bug" in done.stderr
    assert ("SystemExit" in done.stderr) == (hook == "python's"), done.stderr
    assert done.stderr.count("Traceback") == (2 if hook == "python's" else 1), done.stderr
