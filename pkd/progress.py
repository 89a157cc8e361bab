"""The only place that draws progress bars (rich). Steps report counts; this module renders them.

A step calls `update()` as work completes; the bar shows done/total, rate and ETA, tokens/s, and
for request-driven steps requests/s and failures, and a note on a third line while one is set
(`note()`: e.g. a rate-limit pause, with how long and until when). `trainer_progress()` is the same display for
a transformers/TRL Trainer (step, loss, CE/KL, tokens/s, epoch, ETA). Drawn on the terminal
(`pkd.console.terminal()`, stderr) so stdout stays clean for summaries and JSON, and so that it
shows while a step's library output goes to its log file; with `enabled=False` (library use,
tests) it draws nothing.

Every display fits 80 terminal columns: the bar and its counts on one line, the rates (and the
trainer's loss) on a second line below it, so nothing is cut to "…". The displays never capture
stdout/stderr (rich's `redirect_stdout`/`redirect_stderr`): on a real terminal that capture
would pull the libraries' prints out of the step's log file (`pkd.console`) onto the screen.
`status()` is a spinner for long phases that have no count to show.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

from pkd.console import terminal


def _display(*columns: Any, stats: bool = True) -> Any:
    """A rich Progress on the terminal that leaves fds 1/2 alone, with each task's `stats` field
    drawn on a line of its own under its bar."""
    from rich.progress import Progress
    from rich.text import Text

    class _TwoLines(Progress):
        def get_renderables(self):  # noqa: ANN202
            yield self.make_tasks_table(self.tasks)
            for task in self.tasks if stats else ():
                if line := task.fields.get("stats"):
                    yield Text.from_markup("  " + line, overflow="fold")
                if note := task.fields.get("note"):
                    yield Text("  " + note, style="yellow", overflow="fold")

    return _TwoLines(*columns, console=terminal(), refresh_per_second=4, redirect_stdout=False, redirect_stderr=False)


@contextmanager
def status(message: str, *, enabled: bool = True) -> Iterator[None]:
    """A spinner with the elapsed time for a long phase that reports no counts (a world build, a
    round's sampling, TRL's reference pass, lm-eval's tasks)."""
    if not enabled:
        yield
        return
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = _display(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), stats=False)
    bar.add_task(message, total=None)
    with bar:
        yield


class _Shown:
    """A display that starts and stops with its `with` block; `_bar` None draws nothing."""

    _bar: Any = None

    def __enter__(self) -> Self:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()


class StepProgress(_Shown):
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
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._unit, self._requests_shown = unit, requests
        self._bar = _display(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task(description, total=total, completed=done, stats=self._stats("-", 0.0, 0.0, 0), note="")

    def note(self, text: str) -> None:
        """Show `text` on a line under the rates until the next note ("" clears it): a wait that
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
        rate = f"{speed:.1f}" if speed else "-"
        self._bar.update(self._task, advance=done, stats=self._stats(rate, self._requests / elapsed, self._tokens / elapsed, self._failures))

    def _stats(self, rate: str, rps: float, tps: float, failures: int) -> str:
        """The second line: units/s, tokens/s and, for request-driven steps, requests/s and failures."""
        line = f"{self._unit} {rate}/s" + (f" · {tps:,.0f} tok/s" if self._tokens else "")
        if self._requests_shown:
            line += f" · {rps:.1f} req/s · [red]{failures} failed[/]"
        return line

    def say(self, text: str) -> None:
        """A status line above the bar (e.g. the batches' states at each poll)."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)


def trainer_progress(description: str, *, epoch_of: Callable[[int], float] | None = None, enabled: bool = True) -> Any:
    """A `transformers.TrainerCallback` drawing one bar for a training run: optimizer steps of
    `max_steps`, ETA, and from each log record the loss, CE/KL, tokens/s and the epoch
    (`epoch_of(global_step)` when the caller knows better than Trainer, e.g. for a stream)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.start = time.monotonic()
            self.first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if not enabled or not state.is_world_process_zero:
                return
            self.start, self.first_step = time.monotonic(), state.global_step
            self.bar = _display(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(description, total=state.max_steps, completed=state.global_step, stats="")
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
            self.bar.update(self.task, stats=" · ".join(parts))

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(self.task, completed=state.global_step)
                self.bar.stop()
                self.bar = None

    return _Progress()


class PartsProgress(_Shown):
    """One line for launched parts: done/total and how many run, wait or failed."""

    def __init__(self, total: int, *, description: str = "parts", enabled: bool = True) -> None:
        self._bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        self._bar = _display(  # like every display here, it leaves stdout/stderr to the step's log
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("done, {task.fields[running]} running, {task.fields[pending]} pending, [red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            stats=False,
        )
        self._task = self._bar.add_task(description, total=total, running=0, pending=0, failed=0)

    def show(self, counts: dict[str, int]) -> None:
        """`counts`: parts done, running, pending, failed."""
        if self._bar is not None:
            self._bar.update(self._task, completed=counts.get("done", 0), running=counts.get("running", 0), pending=counts.get("pending", 0), failed=counts.get("failed", 0))
