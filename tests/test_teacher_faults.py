"""`pkd teacher-sample` against the fault-injecting endpoint (tests/fake_api.py): malformed 200s,
connection resets, long Retry-After, retrying failed prompts, unwritable or busy output folders,
and time-interval commits. Every request is paid for: nothing answered may be lost or misfiled."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from fake_api import FakeAPI, Reply, completion, error, last_user
from test_teacher_sample import ledger, manifest, one_error_line, prompts_file, rows, sample


def _malformed(body: dict[str, Any], kind: str) -> Reply:
    good = completion(body)
    bad = dict(good)
    if kind == "no_choices":
        del bad["choices"]
    elif kind == "null_choices":
        bad["choices"] = None
    elif kind == "object_choices":
        bad["choices"] = {"0": good["choices"][0]}
    elif kind == "no_message":
        bad["choices"] = [{k: v for k, v in c.items() if k != "message"} for c in good["choices"]]
    elif kind == "duplicate_index":
        bad["choices"] = [dict(c, index=0) for c in good["choices"]]
    elif kind == "index_out_of_range":
        bad["choices"] = [dict(c, index=c["index"] + 1) for c in good["choices"]]
    elif kind == "not_json":
        return Reply(200, b"<html>gateway</html>")
    return Reply(200, bad)


MALFORMED = ["no_choices", "null_choices", "object_choices", "no_message", "duplicate_index", "index_out_of_range", "not_json"]


def test_malformed_200s_are_retried_and_never_misfiled(tmp_path: Path) -> None:
    kinds = {f"q{i}": kind for i, kind in enumerate(MALFORMED)}
    api = FakeAPI(lambda body, attempt: _malformed(body, kinds[last_user(body)]) if last_user(body) in kinds and attempt == 1 else None)
    out = tmp_path / "out"
    try:
        result = sample(prompts_file(tmp_path, 10), out, api.url, "--n", "2", "--concurrency", "4")
        assert result.exit_code == 0, result.output
        assert sorted(r["sample_id"] for r in rows(out)) == sorted(f"q{i}#{j}" for i in range(10) for j in range(2))
        assert all(r["response"] == f"answer {r['sample_index']} to {r['prompt_id']}" for r in rows(out))
        c = manifest(out).counts
        assert c["retries"] == len(MALFORMED) and "failed" not in c
    finally:
        api.close()


def test_a_prompt_that_stays_malformed_is_recorded_and_answered_work_kept(tmp_path: Path) -> None:
    api = FakeAPI(lambda body, attempt: _malformed(body, "null_choices") if last_user(body) == "q3" else None)
    out = tmp_path / "out"
    try:
        result = sample(prompts_file(tmp_path), out, api.url, "--max-retries", "2", "--concurrency", "3")
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output and api.attempts["q3"] == 3
        m = manifest(out)
        assert m.counts["failed_bad_response"] == 1 and m.counts["samples"] == 11
        failure = json.loads((out / "failures.jsonl").read_text())
        assert failure["prompt_id"] == "q3" and "'choices' is missing or null" in failure["error"]["message"]
        assert "rerun with --retry-failed" in result.output
    finally:
        api.close()


def test_a_reset_before_the_first_answer_is_transient(tmp_path: Path) -> None:
    def script(body: dict, attempt: int) -> Reply | None:
        if last_user(body) == "q0" and attempt <= 2:
            return Reply(reset=True)
        return Reply(200, completion(body), delay_s=0.3)  # q0's resets come before any answer

    api = FakeAPI(script)
    out = tmp_path / "out"
    try:
        result = sample(prompts_file(tmp_path), out, api.url, "--concurrency", "4")
        assert result.exit_code == 0, result.output
        assert manifest(out).counts["samples"] == 12 and api.attempts["q0"] == 3
    finally:
        api.close()


def test_a_whole_first_wave_of_resets_stops_and_names_the_cause(tmp_path: Path) -> None:
    api = FakeAPI(lambda body, attempt: Reply(reset=True))
    try:
        result = sample(prompts_file(tmp_path), tmp_path / "out", api.url, "--concurrency", "3")
        assert result.exit_code == 3
        line = one_error_line(result)
        assert "cannot reach the teacher" in line and "()" not in line and "Error" in line  # e.g. (ReadError: ...)
        assert len(api.bodies) <= 6
    finally:
        api.close()


def test_refused_connection_names_its_cause(tmp_path: Path) -> None:
    from pkd.engines.serve import free_port

    result = sample(prompts_file(tmp_path), tmp_path / "out", f"http://127.0.0.1:{free_port()}/v1")
    assert result.exit_code == 3 and "ConnectionRefusedError" in one_error_line(result)


@pytest.mark.parametrize("header", ["3600", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_retry_after_is_capped(tmp_path: Path, header: str) -> None:
    api = FakeAPI(lambda body, attempt: error(429, "slow down", {"Retry-After": header}) if last_user(body) == "q0" and attempt == 1 else None)
    out = tmp_path / "out"
    try:
        start = time.monotonic()
        result = sample(prompts_file(tmp_path, 4), out, api.url, "--retry-after-max", "0.3")
        assert result.exit_code == 0, result.output
        assert time.monotonic() - start < 20 and manifest(out).counts["samples"] == 4
        assert "retry after capped" in result.output
    finally:
        api.close()


def test_retry_failed_requests_only_transient_failures_again(tmp_path: Path) -> None:
    healthy = {"on": False}

    def script(body: dict, attempt: int) -> Reply | None:
        if last_user(body) == "q5":
            return error(400, "prompt is too long")
        if last_user(body) in ("q2", "q7") and not healthy["on"]:
            return error(503, "overloaded")
        return None

    api, out, prompts = FakeAPI(script), tmp_path / "out", prompts_file(tmp_path)
    try:
        first = sample(prompts, out, api.url, "--max-retries", "0")
        assert first.exit_code == 0 and "3 prompts failed for good" in first.output and "2 for a transient reason: rerun with --retry-failed" in first.output
        again = sample(prompts, out, api.url)
        assert "nothing to do" in again.output and "--retry-failed" in again.output
        healthy["on"] = True
        sent = len(api.bodies)
        retried = sample(prompts, out, api.url, "--retry-failed")
        assert retried.exit_code == 0, retried.output
        assert sorted(api.prompts()[sent:]) == ["q2", "q7"]  # not q5 (a 400 is final), not the answered ones
        m = manifest(out)
        assert m.complete and m.counts["prompts_done"] == 12 and m.counts["samples"] == 11
        assert m.counts["failed"] == 1 and m.counts["failed_http_400"] == 1 and "failed_http_503" not in m.counts
        assert [f["prompt_id"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())] == ["q5"]
        assert sorted(r["prompt_id"] for r in rows(out)) == sorted(f"q{i}" for i in range(12) if i != 5)
        assert "nothing to do" in sample(prompts, out, api.url, "--retry-failed").output
    finally:
        api.close()


def test_unwritable_or_file_output_costs_no_request(tmp_path: Path) -> None:
    api = FakeAPI()
    try:
        (tmp_path / "file").write_text("x")
        for out, why in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "cannot write there")):
            result = sample(prompts_file(tmp_path), out, api.url)
            assert result.exit_code != 0 and why in one_error_line(result) and str(out) in result.output
        assert not api.bodies and (tmp_path / "file").read_text() == "x"
    finally:
        api.close()


def test_a_second_run_on_a_busy_folder_is_refused(tmp_path: Path) -> None:
    api, out = FakeAPI(), tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a live run holds
        result = sample(prompts_file(tmp_path), out, api.url)
        assert result.exit_code != 0 and "is in use by another running `pkd teacher-sample`" in one_error_line(result)
        assert not api.bodies
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert sample(prompts_file(tmp_path), out, api.url).exit_code == 0  # a dead run's lock is gone
    finally:
        os.close(fd)
        api.close()


def test_answers_commit_on_a_time_interval(tmp_path: Path) -> None:
    api, out = FakeAPI(delay_s=0.1), tmp_path / "out"
    try:
        result = sample(prompts_file(tmp_path, 10), out, api.url, "--concurrency", "1", "--shard-size", "1000", "--commit-interval", "0.25")
        assert result.exit_code == 0, result.output
        parts = [f.path for f in manifest(out).files if f.path.startswith("ledger/")]
        assert len(parts) >= 3 and len(ledger(out)) == 10  # not one commit at the end
    finally:
        api.close()


def test_a_429_pause_is_shown_on_the_progress_line(tmp_path: Path) -> None:
    """Retry-After: 3600 under --retry-after-max 2 pauses every worker; the progress line says so
    (status, how long, until when, the cap) instead of standing still without a word. A real
    subprocess on a terminal-like stderr, so that the bar draws as it does for a user."""
    import subprocess
    import sys

    def script(body: dict, attempt: int) -> Reply | None:
        if last_user(body) == "q1" and attempt == 1:
            return error(429, "rate limited", {"Retry-After": "3600"})
        return None

    api = FakeAPI(script)
    repo = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": str(repo), "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "200", "OPENAI_API_KEY": ""}
    try:
        args = [sys.executable, str(repo / "cli.py"), "teacher-sample", "--prompts", str(prompts_file(tmp_path)), "--out", str(tmp_path / "out"),
                "--base-url", api.url, "--model", "m", "--retry-after-max", "2", "--concurrency", "2"]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - start >= 2  # the pause happened
        assert "HTTP 429: all paused 2 s, until " in proc.stderr and "(Retry-After 3,600 s capped)" in proc.stderr, proc.stderr[-2000:]
        assert manifest(tmp_path / "out").counts["samples"] == 12
    finally:
        api.close()
