"""Each trial's own stdout and stderr, in a file logged as the artifact `logs/trial.log` of its
MLflow run, so worker output stays off the sweep's console and a failure's last lines can be
shown by `bnew sweep status` and the report (tag `bnew.log_tail`)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import IO, Iterator

from mlflow import MlflowClient

from sweeps.core.schema import LOG_TAIL_TAG

ARTIFACT_DIR = "logs"
LOG_NAME = "trial.log"
TAIL_LINES = 12


class Tee:
    """A text stream writing to a terminal stream and a file (debug runs keep their console)."""

    def __init__(self, stream: IO[str], file: IO[str]):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno... as the terminal's
        return getattr(self.stream, name)


@contextlib.contextmanager
def capture_output(path: Path, tee: bool) -> Iterator[None]:
    """Append this process's stdout and stderr to `path` while the block runs.

    Without `tee` (a Ray worker) the file descriptors themselves are redirected, so output of
    native code and of Ray's own loggers lands in the file too; with `tee` (an in-process debug
    run) Python's streams are copied to the file and still reach the terminal and debugger."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as file:
        file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} ---\n")
        if tee:
            with contextlib.redirect_stdout(Tee(sys.stdout, file)), contextlib.redirect_stderr(Tee(sys.stderr, file)):
                yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        try:
            for fd in saved:
                os.dup2(file.fileno(), fd)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)


def append(path: Path, text: str) -> None:
    """Add to the log without printing (a traceback belongs in the log, not on the console)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "a") as file:
        file.write(text)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of the log (at most 4,000 characters, a safe MLflow tag value)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])[-4000:]


def upload(client: MlflowClient, run_id: str, path: Path, failed: bool) -> None:
    """The log as `logs/trial.log` of the run; a failed run also gets its last lines as a tag
    (which its retry drops as it reopens the run: `Tracker.open_trial_run`)."""
    if not path.is_file():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    if failed:
        client.set_tag(run_id, LOG_TAIL_TAG, tail(path))
