"""One writer per output folder: `pkd cache-logits`, `pkd proxy-align` and `pkd train-student`
refuse an --out that another live process holds (two runs on one folder interleave shards,
checkpoints or stages), in one line, before loading a model; the lock is an flock on the folder,
so a run killed with `kill -9` leaves nothing to clean up and the next run proceeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fake_api import FakeAPI
from pkd.cli import app

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a live pkd run holds on its --out
print("holding", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("locks-teacher")
    prompts = tmp / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(40)))
    api = FakeAPI()
    try:
        r = CliRunner().invoke(app, ["teacher-sample", "--prompts", str(prompts), "--out", str(tmp / "teacher"), "--base-url", api.url, "--model", "m"])
        assert r.exit_code == 0, r.output
    finally:
        api.close()
    return str(tmp / "teacher")


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """An output folder locked by a second, real process (killed with SIGKILL at the end)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        yield out, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _error(result: Result) -> str:
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _commands(out: Path, teacher: str, tiny_family, scored_cache: str) -> dict[str, list[str]]:
    return {
        "cache-logits": ["cache-logits", "--teacher", teacher, "--model", str(tiny_family.proxy), "--no-adapter", "--split", "warmup", "--engine", "hf", "--k", "4", "--out", str(out)],
        "proxy-align": ["proxy-align", "--teacher", teacher, "--model", str(tiny_family.proxy), "--out", str(out), "--rounds", "0", "--warmup-epochs", "0"],
        "train-student": ["train-student", "--cache", scored_cache, "--student", str(tiny_family.student), "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--report-to", "none"],
    }


@pytest.mark.parametrize("step", ["cache-logits", "proxy-align", "train-student"])
def test_a_busy_output_folder_is_refused(step: str, held: tuple[Path, subprocess.Popen], teacher: str, tiny_family, scored_cache: str) -> None:
    out, _ = held
    result = CliRunner().invoke(app, _commands(out, teacher, tiny_family, scored_cache)[step])
    assert f"is in use by another running `pkd {step}`" in _error(result)
    assert not [p for p in out.rglob("*")], "the refused run wrote into the busy folder"


def test_kill_9_releases_the_lock(held: tuple[Path, subprocess.Popen], teacher: str, tiny_family, scored_cache: str) -> None:
    out, proc = held
    line = _commands(out, teacher, tiny_family, scored_cache)["cache-logits"]
    assert "in use" in _error(CliRunner().invoke(app, line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = CliRunner().invoke(app, line)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["complete"]
