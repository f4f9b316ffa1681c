"""What the console and MLflow UI tests and `make images` (docs/make_images.py) share: a sweep run
on a pseudo-terminal and replayed on a small terminal emulator, a terminal frame rendered to PNG
by headless Chromium, and MLflow's UI in headless Chromium: the runs table and the parallel
coordinates of the compare view."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from servers import CHROMIUM, sweep_env as own_sweep_env

COLUMNS, ROWS = 110, 40
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
OSC = re.compile(r"\x1b\][^\x07\x1b]*(\x07|\x1b\\)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def sweep_env(**extra: str) -> dict[str, str]:
    """`servers.sweep_env` with a terminal of COLUMNS x ROWS."""
    return own_sweep_env(TERM="xterm-256color", COLUMNS=str(COLUMNS), LINES=str(ROWS), **extra)


def run_in_pty(args: list[str], cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 900) -> tuple[int, list[bytes]]:
    """Run `python -m sweeps.cli ARGS` on a pseudo-terminal; its exit code and output chunks."""
    env = env or sweep_env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, its stdin/stdout/stderr on the terminal
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "sweeps.cli", *args], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        if select.select([fd], [], [], 1.0)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    else:
        os.kill(pid, 9)
    os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), chunks


class Terminal:
    """Just enough of a terminal for rich's live view: text, colours (SGR), CR, LF, cursor up and
    erase line. `lines` is everything on screen and scrolled off, as ANSI text."""

    def __init__(self) -> None:
        self.cells: list[list[tuple[str, str]]] = [[]]
        self.row = self.col = 0
        self.style = ""

    def feed(self, text: str) -> None:
        text = OSC.sub("", text)
        position = 0
        for match in CSI.finditer(text):
            self.write(text[position : match.start()])
            self.control(match.group(1), match.group(2))
            position = match.end()
        self.write(text[position:])

    def control(self, params: str, command: str) -> None:
        count = int(params) if params.isdigit() else 1
        if command == "A":
            self.row = max(0, self.row - count)
        elif command == "K":
            line = self.cells[self.row]
            del line[0 if params == "2" else self.col :]
        elif command == "G":
            self.col = count - 1
        elif command == "m":
            self.style = "" if params in ("", "0") else self.style + f"\x1b[{params}m"

    def write(self, text: str) -> None:
        for char in text:
            if char == "\r":
                self.col = 0
            elif char == "\n":
                self.row += 1
                if self.row == len(self.cells):
                    self.cells.append([])
            elif char == "\b":
                self.col = max(0, self.col - 1)
            elif char >= " " and char != "\x1b":
                line = self.cells[self.row]
                line.extend([(" ", "")] * (self.col - len(line) + 1))
                line[self.col] = (char, self.style)
                self.col += 1

    def lines(self, ansi: bool = False) -> list[str]:
        rendered = []
        for line in self.cells:
            text, style = "", ""
            for char, char_style in line:
                if ansi and char_style != style:
                    text += "\x1b[0m" + char_style
                    style = char_style
                text += char
            rendered.append((text + ("\x1b[0m" if ansi else "")).rstrip())
        while rendered and not rendered[-1].strip():
            rendered.pop()
        return rendered


def plain(text: str) -> str:
    return CSI.sub("", OSC.sub("", text))


def running_count(frame: list[str]) -> int:
    """Trials the frame shows running; -1 for a frame caught between two redraws."""
    lines = [plain(line) for line in frame]
    done = {line.split()[1] for line in lines if line.startswith("done ")}
    running = [line.split()[0] for line in lines if re.search(r"  epoch \d+/\d+ ", line)]
    return -1 if done & set(running) else len(running)


def replay(chunks: list[bytes]) -> tuple[Terminal, list[str]]:
    """The terminal after the whole output, and the last whole frame (ending in the sweep's ETA)
    that shows the most running trials, as ANSI lines."""
    terminal, best_frame = Terminal(), []
    for chunk in chunks:
        terminal.feed(chunk.decode(errors="replace"))
        frame = terminal.lines(ansi=True)
        if "sweep eta" in plain(frame[-1] if frame else "") and running_count(frame) >= running_count(best_frame):
            best_frame = frame
    return terminal, best_frame


def save_console_screenshot(ansi_lines: list[str], path: Path, title: str) -> None:
    """Terminal lines as a PNG: rich's SVG export, rendered by headless Chromium."""
    from rich.console import Console
    from rich.text import Text

    console = Console(record=True, width=COLUMNS, file=io.StringIO(), force_terminal=True)  # record only
    for line in ansi_lines:
        console.print(Text.from_ansi(line))  # wrapped at COLUMNS, as the terminal wraps a long line
    height = 120 + 24 * len(console.export_text(clear=False).splitlines())
    svg = path.with_suffix(".svg")
    console.save_svg(str(svg), title=title)
    subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, "--hide-scrollbars", f"--screenshot={path}",
                    f"--window-size=1280,{height}", svg.as_uri()], check=True, capture_output=True, timeout=120)
    svg.unlink()


@contextmanager
def browser_page() -> Iterator:
    """A page of headless Chromium (Debian's, driven by Playwright)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.set_default_timeout(180_000)  # the UI's first load is slow on a busy machine
        yield page
        browser.close()


def close_assistant(page) -> None:
    """MLflow 3.17 opens its assistant panel beside every page; it hides the runs."""
    close = page.locator('button[aria-label="Close"]')
    if close.count():
        close.first.click()


def show_nested_runs(page, link: str, names: list[str], metrics: list[str]):
    """The experiment's runs table at `link` (the link a sweep prints), its parent run "demo"
    expanded until the runs `names` show, with a column for each of `metrics`; returns the
    table's `main` element."""
    page.goto(link)
    page.get_by_text("matching runs").wait_for()
    main = page.locator("main")
    run_names = main.locator('[id^="cell-attributes.`Run Name`"]')  # not the breadcrumb's "demo"
    run_names.get_by_role("link", name="demo", exact=True).wait_for()
    close_assistant(page)
    page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
    for name in names:
        main.get_by_role("link", name=name, exact=True).wait_for()
    for metric in metrics:
        page.get_by_role("button", name="Columns").click()
        page.get_by_placeholder("Search columns").fill(metric)
        page.locator(".du-bois-light-tree-title").filter(has_text=re.compile(f"^{re.escape(metric)}$")).click()
        page.keyboard.press("Escape")
        main.locator('[role="columnheader"]', has_text=metric).first.wait_for()
    page.evaluate("document.activeElement.blur()")  # no focus ring on the Columns button
    page.wait_for_timeout(1000)  # let the table settle before a screenshot
    return main


def show_parallel_coordinates(page, server: str, experiment_id: str, run_ids: list[str],
                              params: list[str], metrics: list[str]):
    """The compare view of the runs, its parallel-coordinates plot of `params` and `metrics`
    (instead of MLflow's default choices); returns the plot's element."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    page.goto(f"{server}/#/compare-runs?{query}")
    plot = page.locator('[id$="content-parallel-coordinates-plot"]')
    plot.get_by_text("Parameters:").wait_for()
    close_assistant(page)
    selects = plot.locator(".du-bois-light-select")
    chosen = selects.locator(".du-bois-light-select-selection-item")
    while chosen.count():  # MLflow's default choices: replace them
        chosen.first.locator(".du-bois-light-select-selection-item-remove").click()
    for select, keys in ((selects.nth(0), params), (selects.nth(1), metrics)):
        for key in keys:
            select.click()
            page.keyboard.type(key)
            page.locator(f'.du-bois-light-select-item-option[title="{key}"]').click()
            page.keyboard.press("Escape")
    for label in params + metrics:  # the plot's axis titles
        plot.locator("svg text", has_text=label).first.wait_for()
    page.wait_for_timeout(1000)  # let the plot settle before a screenshot
    return plot
