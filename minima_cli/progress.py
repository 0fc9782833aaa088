"""Rich progress bars for long loops, with a tokens/s column; silent when not asked for."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class TokensPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        tokens = task.fields.get("tokens", 0)
        elapsed = task.elapsed or 0.0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} tok/s", style="cyan")


class StepProgress:
    """Counts steps and tokens; `update(tokens, **fields)` after each step."""

    def __init__(self, progress: Progress | None, task: int | None):
        self.progress, self.task = progress, task
        self.tokens, self.start = 0, time.perf_counter()

    def update(self, tokens: int = 0, **fields: object) -> None:
        self.tokens += tokens
        if self.progress is not None:
            self.progress.update(self.task, advance=1, tokens=self.tokens, **fields)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


@contextlib.contextmanager
def step_progress(
    description: str,
    total: int | None,
    *,
    enabled: bool = True,
    tokens: bool = True,
    **fields: object,
) -> Iterator[StepProgress]:
    """A progress bar over `total` steps with tokens/s and the named `fields` (initial values;
    pass new ones to `update`), e.g. `step_progress("score", 16, loss=float("nan"))`."""
    if not enabled:
        yield StepProgress(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TokensPerSecond()] if tokens else []),
        *(TextColumn(f"{name} {{task.fields[{name}]:.4g}}") for name in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, tokens=0, **fields)
        yield StepProgress(progress, task)
