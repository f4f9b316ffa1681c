"""`python -m bench.cli_startup [--before REV]`: how long three light commands take to start, for
the code here and for an earlier commit side by side in one run.

The earlier commit (default: the last one before `sweeps/` was split into layers, whose CLI
imported torch, Ray and MLflow before parsing its arguments) is checked out into a temporary git
worktree and run from there with the same interpreter and packages. Each command runs `--repeats`
times, interleaved before/after so that load from other processes hits both alike; the table
gives medians and the ratio."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEFORE = "d81ca53"
"""The commit before the layered redesign."""
COMMANDS = {
    "bnew --help": ["--help"],
    "bnew sweep list": ["sweep", "list"],
    "bnew sweep plan demo --no-lookup": ["sweep", "plan", "demo", "--no-lookup"],
}


def seconds(code: Path, arguments: list[str], project: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "BNEW_PROJECT_DIR": str(project)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sweeps.cli", *arguments], cwd=project, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        worktree, project = Path(folder) / "before", Path(folder) / "project"
        project.mkdir()
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(worktree), args.before], check=True)
        try:
            times: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.repeats):
                for name, arguments in COMMANDS.items():
                    for side, code in (("before", worktree), ("after", REPO)):
                        times.setdefault((name, side), []).append(seconds(code, arguments, project))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True)
    print(f"CLI start-up, median of {args.repeats} ({args.before} = before, working tree = after)")
    print(f"{'command':<36} {'before s':>9} {'after s':>8} {'before/after':>13}")
    for name in COMMANDS:
        before, after = (statistics.median(times[(name, side)]) for side in ("before", "after"))
        print(f"{name:<36} {before:>9.2f} {after:>8.2f} {before / after:>12.1f}x")


if __name__ == "__main__":
    main()
