"""The only place that draws progress bars (rich). Steps report counts; this module renders them.

A step calls `update()` as work completes; the bar shows done/total, rate and ETA, tokens/s, and
for request-driven steps requests/s and failures. Drawn on stderr so stdout stays clean for
summaries and JSON; with `enabled=False` (library use, tests) it draws nothing.
"""

from __future__ import annotations

import time
from types import TracebackType


class StepProgress:
    """Units of work done/total (prompts, samples) with their rate and ETA, tokens/s, and, with
    `requests=True`, requests/s and failures."""

    def __init__(
        self, total: int, *, done: int = 0, description: str = "working", unit: str = "samples", requests: bool = False, enabled: bool = True
    ) -> None:
        self._requests = self._tokens = self._failures = 0
        self._start = time.monotonic()
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        counters = "{task.fields[tps]:,.0f} tok/s"
        if requests:
            counters = "{task.fields[rps]:.1f} req/s " + counters + " [red]{task.fields[failures]} failed"
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{unit} {{task.fields[rate]}}/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn(counters),
            console=Console(stderr=True),
            refresh_per_second=4,
        )
        self._task = self._bar.add_task(description, total=total, completed=done, rate="-", rps=0.0, tps=0.0, failures=0)

    def __enter__(self) -> StepProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, *, done: int = 0, tokens: int = 0, requests: int = 0, failures: int = 0) -> None:
        """Add `done` finished units and the tokens/requests/failures that went into them."""
        self._requests += requests
        self._tokens += tokens
        self._failures += failures
        if self._bar is None:
            return
        elapsed = max(time.monotonic() - self._start, 1e-9)
        speed = self._bar.tasks[0].speed
        self._bar.update(
            self._task,
            advance=done,
            rate=f"{speed:.1f}" if speed else "-",
            rps=self._requests / elapsed,
            tps=self._tokens / elapsed,
            failures=self._failures,
        )
