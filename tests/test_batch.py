"""`pkd batch`: several commands in one process give what each gives alone, and a failing one
reports its exit code without stopping the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ARGS = ["--lr", "3e-3", "--batch-size", "4", "--max-length", "64", "--max-steps", "4", "--save-steps", "10", "--logging-steps", "1", "--precision", "fp32", "--report-to", "none"]


def _student(family, cache: str, out: Path, seed: int, *extra: str) -> list[str]:
    return ["train-student", "--cache", cache, "--student", str(family.student), "--out", str(out), "--seed", str(seed), "--full", *ARGS, *extra]


def test_commands_in_one_process_equal_each_run_alone(tiny_family, scored_cache, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [
        {"argv": _student(tiny_family, scored_cache, tmp_path / "a", 1), "log": str(tmp_path / "a.log")},
        {"argv": _student(tiny_family, scored_cache, tmp_path / "b", 2, "--alpha", "0"), "log": str(tmp_path / "b.log")},
        {"argv": ["train-student", "--cache", str(tmp_path / "missing"), "--student", str(tiny_family.student), "--out", str(tmp_path / "c")], "log": str(tmp_path / "c.log")},
        {"argv": _student(tiny_family, scored_cache, tmp_path / "d", 3, "--weight-ce"), "log": str(tmp_path / "d.log")},
    ]
    done = subprocess.run([sys.executable, "-m", "pkd.cli", "batch"], input="".join(json.dumps(j) + "\n" for j in jobs), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["exit_code"] != 0 for r in replies] == [False, False, True, False] and [r["argv"] for r in replies] == [j["argv"] for j in jobs]
    assert "error:" in (tmp_path / "c.log").read_text() and "trained" in (tmp_path / "d.log").read_text()
    for name, seed, extra in (("b", 2, ["--alpha", "0"]), ("d", 3, ["--weight-ce"])):  # alone, in its own process
        alone = subprocess.run([sys.executable, "-m", "pkd.cli", *_student(tiny_family, scored_cache, tmp_path / f"{name}-alone", seed, *extra)], capture_output=True, text=True, env=env, timeout=600)
        assert alone.returncode == 0, alone.stderr[-2000:]
        weights = "model/model.safetensors"
        assert (tmp_path / name / weights).read_bytes() == (tmp_path / f"{name}-alone" / weights).read_bytes()
