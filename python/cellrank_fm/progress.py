"""Progress bars with rates, shared by every long-running command."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.console import Console

class _RateColumn(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"-- {self.unit}/s", style="progress.data.speed")
        if speed >= 1e6:
            return Text(f"{speed / 1e6:.2f}M {self.unit}/s", style="progress.data.speed")
        if speed >= 1e3:
            return Text(f"{speed / 1e3:.1f}k {self.unit}/s", style="progress.data.speed")
        return Text(f"{speed:.1f} {self.unit}/s", style="progress.data.speed")

def progress_bar(unit: str, *, quiet: bool = False, extra: str = "") -> Progress:
    """A rich progress display (stderr) with count, rate in `unit`/s and time left.

    Use as a context manager; `extra` is a format string over the task's fields (e.g. loss).
    """
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra))
    return Progress(*columns, console=Console(stderr=True), disable=quiet)
