"""The only place that draws progress bars (rich). Steps report counts; this module renders them.

A step calls `update()` as work completes; the bar shows done/total, rate and ETA, tokens/s, and
for request-driven steps requests/s, failures and a note while one is set (`note()`: e.g. a
rate-limit pause, with how long and until when). `trainer_progress()` is the same display for
a transformers/TRL Trainer (step, loss, CE/KL, tokens/s, epoch, ETA). Drawn on the terminal
(`pkd.console.terminal()`, stderr) so stdout stays clean for summaries and JSON, and so that it
shows while a step's library output goes to its log file; with `enabled=False` (library use,
tests) it draws nothing. Every column fits in 80 terminal columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pkd.console import terminal


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
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        counters = "{task.fields[tps]:,.0f} tok/s"
        if requests:
            counters = "{task.fields[rps]:.1f} req/s " + counters + " [red]{task.fields[failures]} failed[/] [yellow]{task.fields[note]}"
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{unit} {{task.fields[rate]}}/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn(counters),
            console=terminal(),
            refresh_per_second=4,
        )
        self._task = self._bar.add_task(description, total=total, completed=done, rate="-", rps=0.0, tps=0.0, failures=0, note="")

    def __enter__(self) -> StepProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def note(self, text: str) -> None:
        """Show `text` at the end of the line until the next note ("" clears it): a wait that
        would otherwise look like a hang, e.g. every worker paused by an HTTP 429."""
        if self._bar is not None:
            self._bar.update(self._task, note=text)

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

    def say(self, text: str) -> None:
        """A status line above the bar (e.g. the batches' states at each poll)."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)


def trainer_progress(description: str, *, epoch_of: Callable[[int], float] | None = None, enabled: bool = True) -> Any:
    """A `transformers.TrainerCallback` drawing one bar for a training run: optimizer steps of
    `max_steps`, ETA, and from each log record the loss, CE/KL, tokens/s and the epoch
    (`epoch_of(global_step)` when the caller knows better than Trainer, e.g. for a stream)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Progress | None = None
            self.start = time.monotonic()
            self.first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if not enabled or not state.is_world_process_zero:
                return
            self.start, self.first_step = time.monotonic(), state.global_step
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=16),
                MofNCompleteColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=terminal(),
                refresh_per_second=4,
            )
            self.task = self.bar.add_task(description, total=state.max_steps, completed=state.global_step, status="")
            self.bar.start()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if self.bar is None or not logs or "loss" not in logs:
                return
            parts = [f"loss {logs['loss']:.3f}"]
            if "ce" in logs and "kl" in logs:
                parts.append(f"ce {logs['ce']:.3f} kl {logs['kl']:.3f}")
            tokens = sum(int(h.get("tokens", 0)) for h in state.log_history if h.get("step", 0) > self.first_step)
            if tokens:
                parts.append(f"{tokens / max(time.monotonic() - self.start, 1e-9):,.0f} tok/s")
            epoch = epoch_of(state.global_step) if epoch_of else logs.get("epoch")
            if epoch is not None:
                parts.append(f"ep {epoch:.2f}")
            self.bar.update(self.task, status=" ".join(parts))

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)
                self.bar.stop()
                self.bar = None

    return _Progress()


class PartsProgress:
    """One line for launched parts: done/total and how many run, wait or failed."""

    def __init__(self, total: int, *, description: str = "parts", enabled: bool = True) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("done, {task.fields[running]} running, {task.fields[pending]} pending, [red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=terminal(),
            refresh_per_second=2,
        )
        self._task = self._bar.add_task(description, total=total, running=0, pending=0, failed=0)

    def __enter__(self) -> PartsProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def show(self, counts: dict[str, int]) -> None:
        """`counts`: parts done, running, pending, failed."""
        if self._bar is not None:
            self._bar.update(self._task, completed=counts.get("done", 0), running=counts.get("running", 0), pending=counts.get("pending", 0), failed=counts.get("failed", 0))
