"""`pkd teacher-sample`: fault paths against a misbehaving local endpoint (fast), and n > 1,
concurrency, logprobs and `kill -9` + rerun exactly-once against the real vLLM teacher (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from fake_api import FakeAPI, Reply, completion, error, last_user
from pkd.cli import app
from pkd.teacher.splits import split_of
from pkd.store import Folder

REPO = Path(__file__).resolve().parent.parent
KEY_ENV, KEY = "PKD_TEST_TEACHER_KEY", "sk-test-Zq81SECRETkey"
FAST = ["--set", "teacher_sample.backoff_s=0.02", "--set", "teacher_sample.backoff_max_s=0.1"]


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    server = FakeAPI()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def prompts_file(tmp_path: Path, n: int = 12, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"q{i}", "reference": f"r{i}"}) + "\n" for i in range(n)))
    return path


def sample(prompts: Path, out: Path, base_url: str, *extra: str, env: dict[str, str] | None = None) -> Result:
    args = ["teacher-sample", "--prompts", str(prompts), "--out", str(out), "--base-url", base_url, "--model", "m", "--n", "1", *FAST, *extra]
    return CliRunner().invoke(app, args, env=env)


def manifest(out: Path) -> Any:
    return Folder(str(out)).read_manifest()


def rows(out: Path) -> list[dict[str, Any]]:
    return [r for f in manifest(out).files if f.path.endswith(".parquet") for r in pq.read_table(out / f.path).to_pylist()]


def ledger(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for f in manifest(out).files if f.path.startswith("ledger/") for x in (out / f.path).read_text().splitlines()]


def one_error_line(result: Result) -> str:
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_transient_errors_are_retried_and_429_pauses_everyone(tmp_path: Path) -> None:
    def script(body: dict, attempt: int) -> Reply | None:
        q = last_user(body)
        if q == "q0" and attempt == 1:
            return error(429, "slow down", {"Retry-After": "0.4"})
        if q == "q1" and attempt <= 3:
            return error(500 + attempt, "overloaded")
        if q == "q2" and attempt == 1:
            return Reply(200, b'{"id": "x", "choices": [')  # malformed JSON
        if q == "q3" and attempt == 1:
            return Reply(200, completion(body), delay_s=1.5)  # slower than the timeout
        return None

    api = FakeAPI(script)
    try:
        result = sample(prompts_file(tmp_path), tmp_path / "out", api.url, "--concurrency", "4", "--request-timeout", "0.5")
        assert result.exit_code == 0, result.output
        c = manifest(tmp_path / "out").counts
        assert c["prompts_done"] == c["samples"] == 12 and c["retries"] == 1 + 3 + 1 + 1 and "failed" not in c
        assert sorted(r["prompt_id"] for r in rows(tmp_path / "out")) == sorted(f"q{i}" for i in range(12))
        first_429 = next(t for b, t in zip(api.bodies, api.times) if last_user(b) == "q0")
        q0_retry = [t for b, t in zip(api.bodies, api.times) if last_user(b) == "q0"][1]
        assert q0_retry - first_429 >= 0.39  # Retry-After honoured
        assert len([t for t in api.times if first_429 + 0.05 < t < first_429 + 0.35]) < 4  # the others paused too (at most the 3 already sent)
    finally:
        api.close()


def test_permanent_failures_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    def script(body: dict, attempt: int) -> Reply | None:
        if last_user(body) == "q5":
            return error(400, "prompt is too long")
        if last_user(body) == "q2":
            return Reply(200, completion(body), delay_s=0.6)  # always slower than the timeout
        return None

    api, out = FakeAPI(script), tmp_path / "out"
    try:
        result = sample(prompts_file(tmp_path), out, api.url, "--request-timeout", "0.3", "--max-retries", "1", "--concurrency", "4")
        assert result.exit_code == 0, result.output
        assert "failed http 400" in result.output and "failed timeout" in result.output
        assert api.attempts["q5"] == 1 and api.attempts["q2"] == 2  # 400 is not retried; timeouts are
        m = manifest(out)
        assert m.complete and m.counts["failed"] == 2 and m.counts["failed_http_400"] == 1 and m.counts["failed_timeout"] == 1
        failures = {f["prompt_id"]: f["error"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
        assert failures["q5"]["kind"] == "http_400" and failures["q5"]["message"].endswith("prompt is too long")
        assert failures["q2"]["kind"] == "timeout"
        assert "failures.jsonl" in {f.path for f in m.files} and len(rows(out)) == 10
    finally:
        api.close()


def test_failure_budget_stops_the_run_and_keeps_committed_work(tmp_path: Path) -> None:
    api, out = FakeAPI(lambda body, attempt: error(400, "no") if last_user(body) >= "q3" else None), tmp_path / "out"
    try:
        result = sample(prompts_file(tmp_path), out, api.url, "--max-failures", "2", "--concurrency", "1")
        assert result.exit_code == 4
        assert "3 prompts failed for good (http_400: 3), over the budget of 2 (--max-failures)" in one_error_line(result)
        assert len(api.bodies) == 6  # in file order: q0..q2 answered, q3..q5 failed, then it stopped
        m = manifest(out)
        assert not m.complete and m.counts["samples"] == 3 and m.counts["failed"] == 3
    finally:
        api.close()


def test_bad_key_stops_at_once_and_the_key_never_leaks(tmp_path: Path) -> None:
    api = FakeAPI(key=KEY)
    prompts = prompts_file(tmp_path)
    try:
        good = sample(prompts, tmp_path / "good", api.url, "--api-key-env", KEY_ENV, env={KEY_ENV: KEY})
        assert good.exit_code == 0, good.output
        sent = len(api.bodies)
        bad = sample(prompts, tmp_path / "bad", api.url, "--api-key-env", KEY_ENV, "--concurrency", "2", env={KEY_ENV: KEY + "x"})
        assert bad.exit_code == 3
        assert f"refused the API key (HTTP 401): check the key in ${KEY_ENV}" in one_error_line(bad)
        assert len(api.bodies) - sent <= 2  # stopped at once, not after every prompt
        unset = sample(prompts, tmp_path / "unset", api.url, "--api-key-env", KEY_ENV)
        assert unset.exit_code == 3 and f"${KEY_ENV} is not set" in one_error_line(unset)
        written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
        assert KEY.encode() not in written and KEY not in good.output + bad.output + unset.output
    finally:
        api.close()


def test_unreachable_host_and_unknown_model_stop_with_what_to_fix(tmp_path: Path, api: FakeAPI) -> None:
    from pkd.engines.serve import free_port

    start = time.monotonic()
    result = sample(prompts_file(tmp_path), tmp_path / "out", f"http://127.0.0.1:{free_port()}/v1")
    assert result.exit_code == 3 and time.monotonic() - start < 10
    assert "cannot reach the teacher at http://127.0.0.1:" in one_error_line(result)
    api.script = lambda body, attempt: error(404, "The model `m` does not exist.")
    result = sample(prompts_file(tmp_path), tmp_path / "out2", api.url)
    assert result.exit_code == 3 and "answered 404 for model 'm'" in one_error_line(result) and "check --model" in result.output


def test_filters_drop_empty_truncated_and_duplicate_responses(tmp_path: Path, api: FakeAPI) -> None:
    texts, finish = ["", "same", "same", "cut"], ["stop", "stop", "stop", "length"]
    api.script = lambda body, attempt: Reply(200, completion(body, ["", " ", "", ""] if last_user(body) == "q0" else texts, finish))
    out = tmp_path / "drop"
    assert sample(prompts_file(tmp_path), out, api.url, "--n", "4", "--drop-truncated").exit_code == 0
    c = manifest(out).counts
    assert (c["samples"], c["dropped_empty"], c["dropped_duplicate"], c["dropped_truncated"]) == (11, 11 + 4, 11, 11)
    assert {r["sample_index"] for r in rows(out)} == {1} and {r["response"] for r in rows(out)} == {"same"}
    assert next(x for x in ledger(out) if x["prompt_id"] == "q0")["status"] == "filtered"
    result = sample(prompts_file(tmp_path), out, api.url, "--n", "4", "--drop-truncated")
    assert "nothing to do" in result.output  # a fully filtered prompt is done too
    kept = tmp_path / "keep"
    assert sample(prompts_file(tmp_path), kept, api.url, "--n", "4", "--keep-truncated").exit_code == 0
    assert manifest(kept).counts["samples"] == 22 and {r["finish_reason"] for r in rows(kept)} == {"stop", "length"}


def test_resume_rules_dry_run_and_limits(tmp_path: Path, api: FakeAPI) -> None:
    prompts, out = prompts_file(tmp_path), tmp_path / "out"
    plan = sample(prompts, out, api.url, "--dry-run", "--n", "3")
    assert plan.exit_code == 0 and "12 requests for 36 samples" in plan.output and not api.bodies and not out.exists()

    assert sample(prompts, out, api.url, "--limit", "5").exit_code == 0
    assert len(api.bodies) == 5 and manifest(out).complete
    # debris of a crashed commit: an unlisted shard + ledger naming other prompts, a temporary
    (out / "ledger" / "part-00099.jsonl").write_text(json.dumps({"prompt_id": "q7", "status": "ok"}) + "\n")
    (out / "shards" / "part-00099.parquet").write_bytes(b"partial")
    (out / "shards" / "part-00100.parquet.tmp-abc").write_bytes(b"partial")
    assert "5 already done" in sample(prompts, out, api.url, "--dry-run").output
    result = sample(prompts, out, api.url, "--shard-size", "3")
    assert result.exit_code == 0, result.output
    assert len(api.bodies) == 12 and sorted(api.prompts()) == sorted(f"q{i}" for i in range(12))  # each prompt once
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {f.path for f in manifest(out).files} | {"manifest.json"}  # debris gone
    assert sorted(r["sample_id"] for r in rows(out)) == sorted(f"q{i}#0" for i in range(12))

    assert "nothing to do" in sample(prompts, out, api.url).output and len(api.bodies) == 12
    changed = sample(prompts, out, api.url, "--temperature", "0.5")
    assert changed.exit_code == 2 and "other settings (temperature: 1.0 there, 0.5 now): choose another --out" in one_error_line(changed)
    other = sample(prompts_file(tmp_path, 13, "q.jsonl"), out, api.url)
    assert other.exit_code == 2 and "different prompt set" in one_error_line(other)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert "is not empty" in one_error_line(sample(prompts, tmp_path / "foreign", api.url))


def test_concurrency_is_bounded_and_rows_are_complete(tmp_path: Path, api: FakeAPI) -> None:
    api.delay_s = 0.05
    out = tmp_path / "out"
    result = sample(prompts_file(tmp_path, 24), out, api.url, "--concurrency", "3", "--n", "2", "--system-prompt", "Be brief.")
    assert result.exit_code == 0 and api.max_in_flight == 3
    r = rows(out)[0]
    assert r["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt_id"]}]
    assert r["split"] == split_of(r["prompt_id"]) and r["reference"] == "r" + r["prompt_id"][1:] and r["usage"] == {"prompt_tokens": 7, "completion_tokens": 10}
    assert r["teacher"] == "m" and r["latency_s"] > 0 and r["logprobs"] is None
    folder = Folder(str(out))
    assert all(folder.sha256(f.path) == f.sha256 for f in manifest(out).files)


def test_each_prompt_gets_its_own_reproducible_seed(tmp_path: Path) -> None:
    """One seed for every request would make a seeding server (vLLM) draw the same random numbers
    for every prompt: the samples would be correlated across prompts."""
    api = FakeAPI(lambda body, attempt: error(500, "busy") if attempt == 1 and last_user(body) == "q3" else None)
    try:
        assert sample(prompts_file(tmp_path), tmp_path / "a", api.url, "--seed", "7").exit_code == 0
        seeds: dict[str, list[int]] = {}
        for body in api.bodies:
            seeds.setdefault(last_user(body), []).append(body["seed"])
        assert len(seeds["q3"]) == 2 and len(set(seeds["q3"])) == 1  # a retry repeats its prompt's seed
        assert len({s[0] for s in seeds.values()}) == 12 and all(0 <= s[0] < 2**31 for s in seeds.values())
        first = {p: s[0] for p, s in seeds.items()}
        api.bodies.clear()
        assert sample(prompts_file(tmp_path), tmp_path / "b", api.url, "--seed", "7").exit_code == 0
        assert {last_user(b): b["seed"] for b in api.bodies} == first  # the same draws on a rerun
        # a folder sampled before seeds were derived per prompt does not resume under the new scheme
        m = manifest(tmp_path / "a")
        del m.config["seeds"]
        Folder(str(tmp_path / "a")).write_manifest(m)
        old = sample(prompts_file(tmp_path), tmp_path / "a", api.url, "--seed", "7")
        assert old.exit_code == 2 and "seeds: None there, 'per prompt' now" in one_error_line(old)
    finally:
        api.close()


# against the real vLLM teacher --------------------------------------------------------------------


@pytest.mark.slow
def test_vllm_n_samples_with_logprobs(tmp_path: Path, vllm_teacher: Any) -> None:
    import datasets

    out = tmp_path / "out"
    result = sample(prompts_file(tmp_path, 16), out, vllm_teacher.base_url, "--model", vllm_teacher.model, "--n", "3", "--concurrency", "8", "--max-tokens", "8", "--top-logprobs", "3", "--keep-truncated", "--shard-size", "10")
    assert result.exit_code == 0, result.output
    got = rows(out)
    per_prompt = {(r["prompt_id"], r["sample_index"]) for r in got}
    assert len(per_prompt) == len(got) == manifest(out).counts["samples"] > 40 and {i for _p, i in per_prompt} <= {0, 1, 2}
    for r in got:
        assert 1 <= len(r["logprobs"]) <= 8 and all(len(t["top_tokens"]) == len(t["top_logprobs"]) == 3 for t in r["logprobs"])
        assert r["teacher"] == vllm_teacher.model and r["usage"]["completion_tokens"] >= len(r["logprobs"])
    shards = [str(out / f.path) for f in manifest(out).files if f.path.endswith(".parquet")]
    assert len(shards) >= 3 and datasets.load_dataset("parquet", data_files=shards, split="train").num_rows == len(got)


@pytest.mark.slow
def test_vllm_seeded_samples_are_independent_across_prompts(tmp_path: Path, vllm_teacher: Any) -> None:
    """Eight copies of one prompt under one run seed: a shared per-request seed would make vLLM
    return the same text eight times; per-prompt seeds give independent draws, and a rerun the same."""
    prompts = tmp_path / "same.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"c{i}", "prompt": "Say anything."}) + "\n" for i in range(8)))
    texts = []
    for out in ("a", "b"):
        result = sample(prompts, tmp_path / out, vllm_teacher.base_url, "--model", vllm_teacher.model, "--seed", "0", "--max-tokens", "8", "--keep-truncated", "--temperature", "1")
        assert result.exit_code == 0, result.output
        texts.append({r["prompt_id"]: r["response"] for r in rows(tmp_path / out)})
    assert texts[0] == texts[1] and len(set(texts[0].values())) > 4


@pytest.mark.slow
def test_kill_9_then_rerun_is_exactly_once(tmp_path: Path, vllm_teacher: Any) -> None:
    proxy, out, prompts = FakeAPI(upstream=vllm_teacher.base_url, delay_s=0.05), tmp_path / "out", prompts_file(tmp_path, 40)
    args = [sys.executable, str(REPO / "cli.py"), "teacher-sample", "--prompts", str(prompts), "--out", str(out), "--base-url", proxy.url,
            "--model", vllm_teacher.model, "--n", "2", "--max-tokens", "8", "--keep-truncated", "--concurrency", "2", "--shard-size", "4"]  # fmt: skip
    try:
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "manifest.json").exists() and sum(f.path.startswith("ledger/") for f in manifest(out).files) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = manifest(out)
        committed = {x["prompt_id"] for x in ledger(out)}
        assert not before.complete and 0 < len(committed) < 40
        first_run = len(proxy.bodies)

        rerun = subprocess.run(args, cwd=REPO, capture_output=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr.decode()
        asked_again = set(proxy.prompts()[first_run:])
        assert not asked_again & committed  # committed samples are never requested again
        assert asked_again | committed == {f"q{i}" for i in range(40)}
        lines = ledger(out)
        assert sorted(x["prompt_id"] for x in lines) == sorted(f"q{i}" for i in range(40))  # each prompt done once
        keys = [(r["prompt_id"], r["sample_index"]) for r in rows(out)]
        assert len(keys) == len(set(keys)) == sum(x["samples"] for x in lines) == manifest(out).counts["samples"]
        assert manifest(out).complete and not [p for p in out.rglob("*tmp*")]
    finally:
        proxy.close()
