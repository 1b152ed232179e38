"""The console the commands print to (rich is imported when one is made)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

WIDTH_OFF_TERMINAL = 160  # a table written to a file or a pipe is not cut at 80 columns


def make_console(**options: object) -> Console:
    """A rich console; off a terminal at least `WIDTH_OFF_TERMINAL` wide (site names stay whole)."""
    from rich.console import Console

    console = Console(highlight=False, **options)  # type: ignore[arg-type]
    if not console.is_terminal:
        console.width = max(console.width, WIDTH_OFF_TERMINAL)
    return console
