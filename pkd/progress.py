"""The only place that draws progress bars (rich). Steps report counts; this module renders them.

A step calls `update()` as work completes; the bar shows done/total, rate and ETA, plus
requests/s, tokens/s and failures for request-driven steps. Drawn on stderr so stdout stays
clean for summaries and JSON; with `enabled=False` (library use, tests) it draws nothing.
"""

from __future__ import annotations

import time
from types import TracebackType


class RequestProgress:
    """Progress of a step that sends requests: units of work (prompts) plus request counters."""

    def __init__(self, total: int, *, done: int = 0, description: str = "working", unit: str = "prompts", enabled: bool = True) -> None:
        self.enabled = enabled
        self._requests = self._tokens = self._failures = 0
        self._start = time.monotonic()
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{unit} {{task.fields[rate]}}/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rps]:.1f} req/s {task.fields[tps]:,.0f} tok/s [red]{task.fields[failures]} failed"),
            console=Console(stderr=True),
            refresh_per_second=4,
        )
        self._task = self._bar.add_task(description, total=total, completed=done, rate="-", rps=0.0, tps=0.0, failures=0)

    def __enter__(self) -> RequestProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, *, done: int = 0, requests: int = 0, tokens: int = 0, failures: int = 0) -> None:
        """Add `done` finished units and the requests/tokens/failures that went into them."""
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


class TokenProgress:
    """Progress of a step that pushes tokens through a model (cache-logits): units done/total,
    their rate, ETA, and tokens/s over this session."""

    def __init__(self, total: int, *, done: int = 0, description: str = "working", unit: str = "samples", enabled: bool = True) -> None:
        self._tokens = 0
        self._start = time.monotonic()
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            console=Console(stderr=True),
            refresh_per_second=4,
        )
        self._task = self._bar.add_task(description, total=total, completed=done, tps=0.0)

    def __enter__(self) -> TokenProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, *, done: int = 0, tokens: int = 0) -> None:
        """Add `done` finished units and the tokens that went through the model for them."""
        self._tokens += tokens
        if self._bar is not None:
            self._bar.update(self._task, advance=done, tps=self._tokens / max(time.monotonic() - self._start, 1e-9))
