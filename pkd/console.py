"""One program's console: while a step runs, the terminal shows only pkd's own lines and progress;
everything the libraries print (transformers/TRL log dictionaries, vLLM's INFO lines, warnings,
their progress bars, child processes' output) goes to the step's log file.

The redirection is done on file descriptors 1 and 2, not on `sys.stdout`: vLLM's worker
processes, C extensions and loggers bound to the streams at import time all write there. pkd's
own output goes through `terminal()`, a rich console on a copy of the original stderr.

The log sits beside the step's output folder (`cache/toy/student` -> `cache/toy/student.log`),
not inside it: every step treats unknown files in its folder as foreign or uncommitted, and a
pushed cache should not carry a machine's log. With `verbose`, nothing is redirected: the
libraries print to the terminal as well, and their Python log records also reach the file.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from pkd.errors import StorageError

# Environment for quiet libraries, in this process and the children it starts.
QUIET_ENV = {
    "TQDM_DISABLE": "1",  # every tqdm bar (datasets, hub downloads, vLLM, TRL's ref log probs)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

_terminal_file: IO[str] | None = None  # the saved terminal while a step's output is redirected
_terminal: Any = None  # the console on it, one per step: progress displays and lines share it


def terminal() -> Any:
    """The rich console pkd's own output goes to: the real terminal even while fds 1 and 2 point
    at a step's log file. One console object, so a line printed while a progress display or
    spinner shows lands above it instead of through it."""
    global _terminal
    if _terminal is None:
        from rich.console import Console

        _terminal = Console(file=_terminal_file, stderr=_terminal_file is None, soft_wrap=True)
    return _terminal


def log_path(out: str, step: str) -> Path:
    """`<out>.log` beside a local output folder; `pkd-logs/<step>.log` for a remote one (s3://)."""
    if "://" in out and not out.startswith("file://"):
        return Path("pkd-logs") / f"{step}.log"
    folder = Path(out.removeprefix("file://"))
    rank = os.environ.get("RANK", "0")
    return folder.with_name(folder.name + (".log" if rank == "0" else f".rank{rank}.log"))


@contextmanager
def step_console(step: str, out: str | None, *, verbose: bool = False) -> Iterator[Path | None]:
    """Run a step with the libraries' output in its log file (appended to, one header per run);
    prints the log's path first, and again if the step fails. `out` None: a step with no folder
    to log beside; the libraries' output is dropped (`verbose` still shows it)."""
    global _terminal_file, _terminal
    path = log_path(out, step).absolute() if out is not None else None
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path or os.devnull, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as e:  # --out under a file, or in a read-only folder: the step never starts
        raise StorageError(f"--out {out}: cannot write there (its log {path}: {type(e).__name__}: {e.strerror or e})") from None
    log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} pkd {step}: {' '.join(sys.argv[1:])}\n")
    if path is not None:
        terminal().print(f"[dim]{step}: library output -> {path}[/]", highlight=False)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    ours = logging.getLogger("pkd")  # pkd's own INFO lines (e.g. the loss path taken) belong in the log too
    saved_level = ours.level
    ours.setLevel(logging.INFO)
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    redirect = ExitStack()
    if not verbose:
        os.environ.update(QUIET_ENV)
        _quiet_loaded_libraries()
        terminal_fd = redirect.enter_context(fds_to(log.fileno()))
        _terminal_file = os.fdopen(os.dup(terminal_fd), "w", buffering=1, encoding="utf-8")
        _terminal = None
    failed = False
    try:
        yield path
    except BaseException:
        failed = True
        raise
    finally:
        redirect.close()  # fds 1 and 2 back on the terminal
        if not verbose:
            if _terminal_file is not None:
                _terminal_file.close()
            _terminal_file = _terminal = None
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        root.removeHandler(handler)
        ours.setLevel(saved_level)
        log.close()
        if failed and path is not None:
            terminal().print(f"[dim]{step}: the libraries' last words are in {path}[/]", highlight=False)


@contextmanager
def fds_to(fd: int) -> Iterator[int]:
    """fds 1 and 2 on `fd` for the block (what C code and child processes write too); yields a
    duplicate of the fd 2 it replaced (the terminal), valid inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield saved[1]
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _quiet_loaded_libraries() -> None:
    """Progress bars of libraries imported before the environment was set (the env covers the
    rest, and child processes)."""
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
