"""Tables on the console that never cut what a user types: in a terminal a rich table whose name
columns keep their whole width (other columns fold), elsewhere (a pipe, a file, CI) plain aligned
text, every cell whole, one row per line."""

from __future__ import annotations

import sys
from typing import Sequence

from rich.console import Console
from rich.table import Table


def show_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], whole: Sequence[str] = (),
               console: Console | None = None) -> None:
    """`whole`: the columns a user types from (names, ids), never cut or folded."""
    console = console or Console(file=sys.stdout)
    if not console.is_terminal:
        widths = [max([len(column), *(len(row[index]) for row in rows)]) for index, column in enumerate(columns)]
        lines = [title, "  ".join(column.ljust(width) for column, width in zip(columns, widths)).rstrip()]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        console.file.write("\n".join(lines) + "\n")
        return
    table = Table(title=title)
    for index, column in enumerate(columns):
        if column in whole:
            table.add_column(column, no_wrap=True, min_width=max([len(column), *(len(row[index]) for row in rows)]))
        else:
            table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
