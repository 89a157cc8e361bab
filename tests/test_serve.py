"""A real vLLM server over the tiny teacher: it answers the OpenAI API, it is gone after its
context (even when the block raises), and a bad start fails fast with the reason."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from pkd.errors import ServerError
from pkd.engines.serve import VllmServer, popen_group, stop_process_group, vllm_server
from pkd.models.tiny import TinyFamily


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_server_lists_its_model(vllm_teacher: VllmServer) -> None:
    models = httpx.get(f"{vllm_teacher.base_url}/models").json()["data"]
    assert [m["id"] for m in models] == ["teacher"] == [vllm_teacher.model]


def test_chat_completion_through_openai_client(vllm_teacher: VllmServer) -> None:
    client = OpenAI(base_url=vllm_teacher.base_url, api_key="unused")
    reply = client.chat.completions.create(
        model=vllm_teacher.model,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        n=2,
        max_tokens=4,
        temperature=1.0,
        seed=0,
    )
    assert len(reply.choices) == 2
    assert all(c.finish_reason in ("length", "stop") for c in reply.choices)
    assert 1 <= reply.usage.completion_tokens <= 8


def test_server_is_gone_after_its_context_even_on_error(
    tiny_family: TinyFamily, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with vllm_server(tiny_family.student, log_path=tmp_path / "server.log") as server:
            assert _port_open(server.port)
            raise RuntimeError("boom")
    assert server.process.poll() is not None
    assert _group_gone(server.process.pid)  # engine core included
    assert not _port_open(server.port)


def test_missing_model_dir_fails_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ServerError, match="does not exist"):
        with vllm_server(tmp_path / "no-such-model"):
            pass
    assert time.monotonic() - start < 1


def test_server_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ServerError, match="exited with code") as info:
        # a directory without config.json
        with vllm_server(tmp_path, startup_timeout=300, log_path=tmp_path / "server.log"):
            pass
    assert "config.json" in str(info.value)  # the log tail says why
    assert time.monotonic() - start < 120


def test_stop_kills_a_group_that_ignores_sigterm() -> None:
    # A leader and a child that both ignore SIGTERM: only the SIGKILL fallback ends them.
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time;"
        " signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']);"
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    with proc.stdout:
        assert proc.stdout.readline().strip() == b"ready"
    start = time.monotonic()
    stop_process_group(proc, grace=0.5)
    assert time.monotonic() - start < 5
    assert proc.returncode == -signal.SIGKILL
    assert _group_gone(proc.pid)


def test_a_server_dies_with_the_process_that_started_it() -> None:
    # A parent that starts a group leader the way vllm_server does, then is killed with -9.
    code = (
        "import subprocess, sys, time; from pkd.engines.serve import popen_group;"
        "child = popen_group([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print(child.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    with parent.stdout:
        child = int(parent.stdout.readline())
    assert not _group_gone(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while not _group_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_gone(child)
