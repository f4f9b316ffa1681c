"""`make images`: the README's screenshots (docs/img/) from one real run of the `demo` preset.

Starts an MLflow server in a temporary folder, runs `bnew sweep run demo --local` (full epochs, as
`make demo` does) on a pseudo-terminal logging to it, renders the console frame that shows the most
running trials (console.png), then takes MLflow's runs table of the sweep (mlflow-runs.png) and the
parallel coordinates of its quantise trials (mlflow-parallel-coordinates.png) in headless Chromium.
Needs Debian's chromium. The tests take the same pictures of a shortened demo, to a temporary folder.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the screenshot helpers the tests use
from screens import browser_page, plain, replay, run_in_pty, save_console_screenshot, show_nested_runs, \
    show_parallel_coordinates, sweep_env  # noqa: E402
from servers import debian_missing, mlflow_server  # noqa: E402

IMAGES = REPO / "docs" / "img"
COMMAND = ["sweep", "run", "demo", "--local"]


def main() -> None:
    if message := debian_missing("chromium"):
        raise SystemExit(f"make images {message}")
    with tempfile.TemporaryDirectory(prefix="bnew-images-") as scratch, mlflow_server(Path(scratch)) as server:
        project = Path(scratch) / "project"
        project.mkdir()
        print(f"running `bnew {' '.join(COMMAND)}` (a few minutes), logged to {server}", flush=True)
        code, chunks = run_in_pty(COMMAND, project, sweep_env(MLFLOW_TRACKING_URI=server))
        terminal, frame = replay(chunks)
        if code != 0 or not frame:
            raise SystemExit("the demo failed:\n" + "\n".join(terminal.lines()[-30:]))
        # A picture for the README shows nothing of this machine (paths, user names).
        shown = plain("\n".join(frame))
        if re.search(r"/(tmp|home|root|work)/", shown):
            raise SystemExit(f"the console frame shows a path of this machine:\n{shown}")
        save_console_screenshot(frame, IMAGES / "console.png", title=f"bnew {' '.join(COMMAND)}")

        client = MlflowClient(server)
        experiment_id = client.get_experiment_by_name("demo").experiment_id
        trials = client.search_runs([experiment_id], "tags.`bnew.role` = 'trial'")
        quantise = [run for run in trials if run.data.tags.get("bnew.stage") == "quantise"]
        link = re.search(r"MLflow UI: (\S+)", "\n".join(terminal.lines())).group(1)  # the link the run printed
        with browser_page() as page:
            show_nested_runs(page, link, sorted(run.info.run_name for run in trials), ["test_acc_binary"]).screenshot(
                path=str(IMAGES / "mlflow-runs.png"))
            show_parallel_coordinates(page, server, experiment_id, [run.info.run_id for run in quantise],
                                      ["axis.optimiser", "axis.seed"], ["test_acc_binary"]).screenshot(
                path=str(IMAGES / "mlflow-parallel-coordinates.png"))
    for run in sorted(quantise, key=lambda run: run.info.run_name):
        print(f"{run.info.run_name}: test_acc_binary {run.data.metrics['test_acc_binary']:.1f}")
    print(f"wrote {', '.join(path.name for path in sorted(IMAGES.glob('*.png')))} in {IMAGES.relative_to(REPO)}")


if __name__ == "__main__":
    main()
