"""The documentation's notebooks, executed on a real Jupyter kernel (nbclient + ipykernel): by the
tests in a scratch folder, and by `make images` in place, so the committed notebook shows the
outputs of a real run and the README its first plot (docs/img/compare-runs.png)."""

from __future__ import annotations

import base64
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
COMPARE_RUNS = REPO / "docs" / "compare-runs.ipynb"
PLOT = REPO / "docs" / "img" / "compare-runs.png"


def execute(notebook: Path, cwd: Path, env: dict[str, str] | None = None, timeout_s: int = 900) -> nbformat.NotebookNode:
    """Run every cell of `notebook` in a fresh kernel whose working directory is `cwd` (where the
    sweep's default MLflow store and Ray results go) and environment `env` (default: this
    process's); raises on the first failing cell."""
    node = nbformat.read(notebook, as_version=4)
    # IPC sockets in `cwd`: a kernel on loopback TCP would take any local user's connection.
    kernel = KernelManager(kernel_name="python3", transport="ipc", ip=str(cwd / "kernel"))
    client = NotebookClient(node, km=kernel, timeout=timeout_s, resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env={**(env if env is not None else os.environ), "PYTHONPATH": str(REPO)})  # this checkout
    finally:
        if kernel.has_kernel:
            kernel.shutdown_kernel()
    return node


def text_outputs(node: nbformat.NotebookNode) -> str:
    """Everything the cells printed to stdout, in order."""
    return "".join(output.get("text", "") for cell in node.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream" and output.name == "stdout")


def first_png(node: nbformat.NotebookNode) -> bytes:
    return next(base64.b64decode(output["data"]["image/png"]) for cell in node.cells if cell.cell_type == "code"
                for output in cell.outputs if "image/png" in output.get("data", {}))


def main() -> None:
    """Execute docs/compare-runs.ipynb in a scratch folder and keep its outputs and plot."""
    with tempfile.TemporaryDirectory(prefix="bnew-notebook-") as scratch:
        node = execute(COMPARE_RUNS, Path(scratch))
    nbformat.write(node, COMPARE_RUNS)
    PLOT.write_bytes(first_png(node))
    print(f"executed {COMPARE_RUNS.relative_to(REPO)}; its plot: {PLOT.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
