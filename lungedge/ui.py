"""Progress bars on stderr (only when it is a terminal), so stdout stays clean for --json."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def progress(total: int, description: str, enabled: bool | None = None):
    """Yield a callable that advances a bar by one step (a no-op when disabled)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
