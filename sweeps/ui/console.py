"""What a sweep shows while it runs: one line per running trial (epoch, latest binary accuracy,
ETA), counts per stage kind, an ETA for the whole sweep from measured epoch times, and one line
per finished or failed trial. In a terminal it is a rich live view; elsewhere (CI, a file, a Ray
job's log) the same events are plain lines, with a progress line now and then.

`bnew sweep run`/`resume` feed it from Ray Tune: the console registers as a sink of the run's
events (`sweeps.run.events`); `bnew sweep status --watch` fills it from MLflow, so it works
from any machine that reaches the tracking server."""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sweeps.analysis.status import SweepStatus, sweep_status
from sweeps.core.plan import Stage
from sweeps.core.schema import PHASES, REUSED_FROM_TAG, STATES, stage_state
from sweeps.run.events import SINKS

PLAIN_PROGRESS_EVERY_S = 60.0
"""Outside a terminal, how often a progress line is printed while trials run."""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@dataclass
class StageProgress:
    """One stage as the console sees it."""

    name: str
    phase: str
    epochs: int
    state: str = "pending"
    epochs_done: int = 0
    accuracy: float | None = None
    """Latest binary test accuracy, %."""
    started: float | None = None
    """Wall-clock time this attempt started (or its first epoch of this attempt began)."""
    epochs_at_start: int = 0
    """Epochs already done when this attempt started (a resumed trial)."""

    def seconds_per_epoch(self, now: float) -> float | None:
        measured = self.epochs_done - self.epochs_at_start
        return (now - self.started) / measured if measured > 0 and self.started is not None else None


@dataclass
class SweepView:
    """The state of a sweep's stages and the epoch times measured so far."""

    stages: dict[str, StageProgress]
    reused: int = 0
    epoch_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Phase -> seconds per epoch of each trial that finished an epoch (newest last)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of_stages(cls, stages: list[Stage], done: set[str] = frozenset(), reused: int = 0) -> "SweepView":
        progress = {
            stage.key: StageProgress(stage.name, stage.phase, stage.epochs, "done" if stage.key in done else "pending")
            for stage in stages
        }
        return cls(progress, reused)

    # --- events --------------------------------------------------------------------------
    def start(self, key: str, now: float, epochs_done: int = 0) -> StageProgress:
        with self.lock:
            stage = self.stages[key]
            stage.state, stage.started, stage.epochs_done, stage.epochs_at_start = "running", now, epochs_done, epochs_done
            return stage

    def epoch(self, key: str, epochs_done: int, accuracy: float | None, now: float) -> None:
        with self.lock:
            stage = self.stages[key]
            stage.epochs_done, stage.accuracy = epochs_done, accuracy
            speed = stage.seconds_per_epoch(now)
            if speed is not None:
                self.epoch_seconds.setdefault(stage.phase, []).append(speed)

    def end(self, key: str, state: str) -> StageProgress:
        with self.lock:
            stage = self.stages[key]
            stage.state = state
            return stage

    # --- estimates -----------------------------------------------------------------------
    def phase_seconds_per_epoch(self, phase: str) -> float | None:
        """Mean measured seconds per epoch of the phase (of all phases when it has none yet)."""
        samples = self.epoch_seconds.get(phase) or [s for values in self.epoch_seconds.values() for s in values]
        return sum(samples) / len(samples) if samples else None

    def trial_eta(self, stage: StageProgress, now: float) -> float | None:
        speed = stage.seconds_per_epoch(now) or self.phase_seconds_per_epoch(stage.phase)
        return None if speed is None else max(0.0, stage.epochs - stage.epochs_done) * speed

    def sweep_eta(self, now: float) -> float | None:
        """Epochs left times the measured seconds per epoch, shared among the running trials."""
        left = [s for s in self.stages.values() if s.state in ("pending", "running")]
        if not left:
            return 0.0
        work = 0.0
        for stage in left:
            speed = self.phase_seconds_per_epoch(stage.phase)
            if speed is None:
                return None
            work += (stage.epochs - stage.epochs_done) * speed
        running = sum(1 for stage in left if stage.state == "running")
        return work / max(1, running)

    def counts(self) -> dict[str, dict[str, int]]:
        """Phase -> state -> number of stages (phases in plan order)."""
        counts = {phase: dict.fromkeys(STATES, 0) for phase in PHASES
                  if any(s.phase == phase for s in self.stages.values())}
        for stage in self.stages.values():
            counts[stage.phase][stage.state] += 1
        return counts

    # --- rendering -----------------------------------------------------------------------
    def trial_line(self, stage: StageProgress, now: float) -> str:
        accuracy = "-" if stage.accuracy is None else f"{stage.accuracy:.1f}%"
        return (f"{stage.name}  epoch {stage.epochs_done}/{stage.epochs}  binary {accuracy}  "
                f"eta {duration(self.trial_eta(stage, now))}")

    def summary_line(self, now: float) -> str:
        parts = []
        for phase, by_state in self.counts().items():
            total = sum(by_state.values())
            extra = ", ".join(f"{by_state[s]} {s}" for s in ("running", "failed", "interrupted") if by_state[s])
            parts.append(f"{phase} {by_state['done']}/{total}" + (f" ({extra})" if extra else ""))
        reused = f"; {self.reused} reused" if self.reused else ""
        return f"{'; '.join(parts)}{reused}; sweep eta {duration(self.sweep_eta(now))}"

    def render(self) -> RenderableType:
        now = time.time()
        with self.lock:
            running = Table.grid(padding=(0, 2))
            for column in ("trial", "epoch", "binary", "eta"):
                # A trial's name folds onto a second line in a narrow terminal; it is never cut.
                running.add_column(column, justify="left" if column == "trial" else "right",
                                   overflow="fold" if column == "trial" else "ellipsis")
            for stage in self.stages.values():
                if stage.state == "running":
                    accuracy = "-" if stage.accuracy is None else f"{stage.accuracy:.1f}%"
                    running.add_row(stage.name, f"epoch {stage.epochs_done}/{stage.epochs}", f"binary {accuracy}",
                                    f"eta {duration(self.trial_eta(stage, now))}")
            counts = Table(box=None, padding=(0, 1), show_edge=False)
            counts.add_column("stage", style="bold")
            for state in STATES:
                counts.add_column(state, justify="right")
            for phase, by_state in self.counts().items():
                counts.add_row(phase, *(str(by_state[state]) for state in STATES))
            eta = self.sweep_eta(now)
            footer = Text(f"sweep eta {duration(eta)}" + (f"  ({self.reused} stages reused)" if self.reused else ""),
                          style="bold")
            return Group(running, counts, footer)


class SweepConsole:
    """Shows a `SweepView`: a rich live view in a terminal, plain lines elsewhere.

    With `verbose`, Tune's reporter prints its tables and this console adds plain lines."""

    def __init__(self, view: SweepView, verbose: bool = False, console: Console | None = None):
        self.view, self.verbose = view, verbose
        self.console = console or Console(file=sys.stdout)  # bound now: stdout is redirected later
        self.last_progress = time.time()
        self.live: Live | None = None

    @property
    def is_live(self) -> bool:
        return self.console.is_terminal and not self.verbose

    def open(self) -> None:
        """Show the view until `close` (transient: only the printed lines stay) and take Tune's
        events. Unless `verbose`, other prints to stdout (Tune's experiment header) are dropped."""
        self.stack = contextlib.ExitStack()
        if self.is_live:
            self.live = self.stack.enter_context(Live(get_renderable=self.view.render, console=self.console,
                                                      refresh_per_second=2, transient=True, redirect_stdout=False))
        if not self.verbose:
            self.stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        SINKS.append(self)

    def close(self) -> None:
        SINKS.remove(self)
        self.live = None
        self.stack.close()

    def line(self, text: str, style: str | None = None) -> None:
        if self.live is not None:
            self.live.refresh()  # a print redraws the last rendered view: render the new state first
            self.console.print(text, style=style, highlight=False, soft_wrap=True)
        else:
            self.console.file.write(text + "\n")
            self.console.file.flush()

    # --- events (from Tune or from MLflow) -----------------------------------------------
    def started(self, stage: Stage, epochs_done: int = 0) -> None:
        with self.view.lock:  # a stage planned after the view (a search's trial)
            self.view.stages.setdefault(stage.key, SweepView.of_stages([stage]).stages[stage.key])
        progress = self.view.start(stage.key, time.time(), epochs_done)
        if not self.is_live:
            resumed = f", from epoch {epochs_done}" if epochs_done else ""
            self.line(f"start {progress.name} ({progress.phase}, {progress.epochs} epochs{resumed})")

    def result(self, key: str, result: dict[str, Any]) -> None:
        self.view.epoch(key, int(result["epoch"]) + 1, result.get("test_acc_binary"), time.time())

    def finished(self, key: str) -> None:
        stage = self.view.end(key, "done")
        accuracy = "" if stage.accuracy is None else f"  binary {stage.accuracy:.1f}%"
        took = "" if stage.started is None else f"  in {duration(time.time() - stage.started)}"
        self.line(f"done   {stage.name}{accuracy}{took}", style="green")

    def failed(self, key: str, reason: str) -> None:
        stage = self.view.end(key, "failed")
        self.line(f"FAILED {stage.name}: {reason}", style="red")

    def retrying(self, key: str, reason: str) -> None:
        stage = self.view.end(key, "pending")
        self.line(f"retry  {stage.name} from its last checkpoint: {reason}", style="yellow")

    def tick(self) -> None:
        """Outside a terminal, a progress line every PLAIN_PROGRESS_EVERY_S while trials run."""
        now = time.time()
        if self.is_live or now - self.last_progress < PLAIN_PROGRESS_EVERY_S:
            return
        self.last_progress = now
        with self.view.lock:
            running = [self.view.trial_line(s, now) for s in self.view.stages.values() if s.state == "running"]
            summary = self.view.summary_line(now)
        self.line(f"progress: {summary}" + "".join(f"\n  {line}" for line in running))


def show_console(stages: list[Stage], reused: set[str], verbose: bool) -> SweepConsole:
    """A console showing `stages`, registered for the run's events until its `close`."""
    console = SweepConsole(SweepView.of_stages(stages, reused=len(reused)), verbose)
    console.open()
    return console


# --- the same view from MLflow: `bnew sweep status NAME --watch` -------------------------------
def view_of_status(status: SweepStatus) -> SweepView:
    """The view of a sweep as MLflow has it: states, running trials' latest epochs, and epoch
    times measured from the runs' clocks (start, end, latest metric)."""
    view = SweepView.of_stages(list(status.plan.stages.values()))
    for key, stage in view.stages.items():
        runs = status.runs[key]
        stage.state = stage_state(runs)
        trained = [run for run in runs if REUSED_FROM_TAG not in run.data.tags]
        if stage.state == "running":
            run = next(run for run in trained if run.info.status in ("RUNNING", "SCHEDULED"))
            epoch = run.data.metrics.get("epoch")
            stage.epochs_done = 0 if epoch is None else int(epoch) + 1
            stage.accuracy = run.data.metrics.get("test_acc_binary")
            stage.started = run.info.start_time / 1000
        for run in trained:
            if run.info.status == "FINISHED" and run.info.end_time and stage.epochs:
                seconds = (run.info.end_time - run.info.start_time) / 1000 / stage.epochs
                view.epoch_seconds.setdefault(stage.phase, []).append(seconds)
                break
    return view


def watch_sweep(name: str, tracking_uri: str, interval: float, console: Console | None = None) -> SweepStatus:
    """Refresh the sweep's view from MLflow every `interval` seconds until its driver has
    finished (the parent run is no longer RUNNING) and no trial runs, or Ctrl-C. Returns the
    last status."""
    console = console or Console()
    with contextlib.ExitStack() as stack:
        live = (stack.enter_context(Live(console=console, auto_refresh=False, transient=True))
                if console.is_terminal else None)
        while True:
            status = sweep_status(name, tracking_uri)
            view = view_of_status(status)
            running = any(stage.state == "running" for stage in view.stages.values())
            if live is not None:
                live.update(Group(Text(f"sweep {name} (MLflow {tracking_uri}, every {interval:g}s)", style="bold"),
                                  view.render()), refresh=True)
            else:
                now = time.time()
                lines = [view.trial_line(s, now) for s in view.stages.values() if s.state == "running"]
                console.file.write(f"{time.strftime('%H:%M:%S')} {view.summary_line(now)}\n"
                                   + "".join(f"  {line}\n" for line in lines))
                console.file.flush()
            if status.sweep_run_status != "RUNNING" and not running:
                return status
            try:
                time.sleep(interval)
            except KeyboardInterrupt:  # Ctrl-C ends the watch, not the sweep
                return status
