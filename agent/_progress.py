"""The progress bar of long commands (`mmagent ingest`, `mmagent eval bfcl`): what, how far, time spent and left."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


def progress_bar(console: Console, *, extra: str | None = None, width: int = 0, transient: bool = False) -> Progress:
    """A rich bar on `console`: the task's description (padded to `width`), the bar, done/total, the `extra`
    text column (a format over the task, e.g. `"{task.fields[right]} right"`), elapsed time and time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(f"{{task.description:<{width}}}" if width else "{task.description}"), BarColumn(),
               MofNCompleteColumn(), *([TextColumn(extra)] if extra else []), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn()]  # fmt: skip
    return Progress(*columns, console=console, transient=transient)
