"""`pkd teacher-sample --batch` against the fault-injecting test server's Batch API: the same
output as the online mode, faults to failures.jsonl and --retry-failed, --no-wait then collect,
`kill -9` at random moments (exactly once, never submitted twice), the budget guard, the key
never written, and request files / output files for runs made elsewhere (vLLM's format)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fake_api import BatchFault, FakeAPI, Reply, completion, error, last_user
from test_teacher_sample import KEY, KEY_ENV, REPO, ledger, manifest, one_error_line, prompts_file, rows, sample

BATCH = ["--batch", "--poll-interval", "0.05"]


def seeded(body: dict[str, Any], attempt: int) -> Reply | None:
    """Answers that depend on the request's seed, so that a wrong seed shows in the output."""
    return Reply(200, completion(body, [f"{last_user(body)} seed {body.get('seed')} #{i}" for i in range(body.get("n", 1))]))


def samples(out: Path) -> list[tuple[Any, ...]]:
    """What later steps learn from, without the per-request latency."""
    return sorted((r["sample_id"], r["split"], json.dumps(r["messages"]), r["response"], r["finish_reason"], r["reference"], r["teacher"], json.dumps(r["usage"])) for r in rows(out))


def failures(out: Path) -> dict[str, dict[str, str]]:
    return {f["prompt_id"]: f["error"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}


def submitted(api: FakeAPI) -> Counter[tuple[str, str]]:
    """How many batches the server holds per (run, part) of pkd's metadata."""
    return Counter((b["metadata"]["pkd_run"], b["metadata"]["pkd_part"]) for b in api.batches.values())


def test_batch_output_equals_online_output_on_the_same_seeds(tmp_path: Path) -> None:
    api, prompts = FakeAPI(seeded), prompts_file(tmp_path, 23)
    extra = ["--n", "3", "--seed", "7", "--system-prompt", "Be brief.", "--temperature", "0.7"]
    try:
        online = sample(prompts, tmp_path / "online", api.url, *extra)
        assert online.exit_code == 0, online.output
        online_bodies = {last_user(b): b for b in api.bodies}
        dry = sample(prompts, tmp_path / "batch", api.url, *extra, *BATCH, "--batch-max-requests", "10", "--dry-run", "--price-input", "1", "--price-output", "2")
        assert dry.exit_code == 0 and "in 3 batch files" in dry.output and "at most $" in dry.output and not api.batches, dry.output
        result = sample(prompts, tmp_path / "batch", api.url, *extra, *BATCH, "--batch-max-requests", "10", "--batch-max-bytes", "1500")
        assert result.exit_code == 0, result.output
        assert samples(tmp_path / "batch") == samples(tmp_path / "online") and len(rows(tmp_path / "batch")) == 23 * 3
        lines = [json.loads(x) for f in api.files.values() if f["purpose"] == "batch" for x in f["data"].splitlines()]
        assert {x["custom_id"]: x["body"] for x in lines} == online_bodies  # the very same requests, seeds included
        sizes = [f["bytes"] for f in api.files.values() if f["purpose"] == "batch"]
        assert len(sizes) >= 4 and max(sizes) <= 1500  # split by bytes as well as by requests
        m, mo = manifest(tmp_path / "batch"), manifest(tmp_path / "online")
        assert m.complete and {k: m.counts[k] for k in ("prompts_done", "samples", "prompt_tokens", "completion_tokens")} == {
            k: mo.counts[k] for k in ("prompts_done", "samples", "prompt_tokens", "completion_tokens")
        }
        again = sample(prompts, tmp_path / "batch", api.url, *extra, *BATCH)
        assert again.exit_code == 0 and "nothing to do" in again.output and len(api.batches) == len(sizes)
    finally:
        api.close()


def test_batch_faults_go_to_failures_and_retry_failed_sends_only_those(tmp_path: Path) -> None:
    faults = {0: BatchFault(expire_after=3), 1: BatchFault(drop=1, duplicate=2, malformed=1), 2: BatchFault(fail=True)}
    api = FakeAPI(lambda body, attempt: error(400, "prompt is too long") if last_user(body) == "q1" else None, batch_fault=faults.get)
    prompts, out = prompts_file(tmp_path, 15), tmp_path / "out"
    try:
        result = sample(prompts, out, api.url, *BATCH, "--batch-max-requests", "5")
        assert result.exit_code == 0, result.output
        f = failures(out)
        kinds = Counter(e["kind"] for e in f.values())
        assert kinds == {"http_400": 1, "batch_expired": 2, "batch_missing": 2, "batch_failed": 5}, f
        assert "malformed lines" in f[max(p for p, e in f.items() if e["kind"] == "batch_missing")]["message"]
        assert "batch duplicate lines" in result.output and "batch malformed lines" in result.output
        keys = [r["sample_id"] for r in rows(out)]
        assert len(keys) == len(set(keys)) == 15 - 10  # the duplicated lines are committed once
        first = len(api.batches)

        retry = sample(prompts, out, api.url, *BATCH, "--batch-max-requests", "50", "--retry-failed")
        assert retry.exit_code == 0, retry.output
        new = [b for b in list(api.batches.values())[first:]]
        sent = [json.loads(x)["custom_id"] for x in api.files[new[0]["input_file_id"]]["data"].splitlines()]
        assert len(new) == 1 and sorted(sent) == sorted(p for p, e in f.items() if e["kind"] != "http_400")  # only the transient failures
        assert set(failures(out)) == {"q1"} and sorted(r["prompt_id"] for r in rows(out)) == sorted(f"q{i}" for i in range(15) if i != 1)
        c = manifest(out).counts
        assert c["prompts_done"] == 15 and c["failed"] == 1 and c["samples"] == 14 and manifest(out).complete
    finally:
        api.close()


def test_retry_online_and_no_wait_then_collect(tmp_path: Path) -> None:
    api = FakeAPI(seeded, batch_fault=lambda i: BatchFault(delay_s=0.8) if i == 0 else BatchFault(expire_after=0))
    prompts, out = prompts_file(tmp_path, 6), tmp_path / "out"
    try:
        submit = sample(prompts, out, api.url, *BATCH, "--no-wait")
        assert submit.exit_code == 0 and "rerun the same command to collect" in submit.output, submit.output
        assert not manifest(out).complete and not rows(out) and len(api.batches) == 1
        state = json.loads((out / "batch/state.json").read_text())
        assert [p["batch_id"] for p in state["parts"]] == ["batch_0"]
        online = sample(prompts, out, api.url)
        assert online.exit_code == 2 and "1 batches of this folder are not collected yet: rerun with --batch" in one_error_line(online)
        collect = sample(prompts, out, api.url, *BATCH)
        assert collect.exit_code == 0 and manifest(out).complete and len(rows(out)) == 6 and len(api.batches) == 1, collect.output

        out2 = tmp_path / "out2"
        expired = sample(prompts, out2, api.url, *BATCH)  # batch 1 expires before running anything
        assert expired.exit_code == 0 and Counter(e["kind"] for e in failures(out2).values()) == {"batch_expired": 6}
        chat_before = len(api.bodies)
        online = sample(prompts, out2, api.url, *BATCH, "--retry-failed", "--retry-online")
        assert online.exit_code == 0, online.output
        assert len(api.batches) == 2 and len(api.bodies) - chat_before == 6  # asked online, no new batch
        assert samples(out2) == samples(out) and not failures(out2) and "failed" not in manifest(out2).counts
    finally:
        api.close()


def test_budget_guard_stops_online_and_refuses_a_batch_before_the_limit(tmp_path: Path) -> None:
    # $0.1 a token both ways; per prompt "qN": estimate 1 + 4 prompt tokens + 10 completion = $1.5, charged 7 + 5 = $1.2
    api, prompts = FakeAPI(), prompts_file(tmp_path, 12)
    price = ["--price-input", "100000", "--price-output", "100000", "--max-tokens", "10"]
    try:
        out = tmp_path / "online"
        stopped = sample(prompts, out, api.url, *price, "--max-cost", "6", "--concurrency", "1")
        assert stopped.exit_code == 5 and "stopped before exceeding --max-cost $6.0000" in one_error_line(stopped)
        c = manifest(out).counts
        assert len(api.bodies) == 4 and c["prompts_done"] == 4 and (c["prompt_tokens"] + c["completion_tokens"]) * 0.1 <= 6 and not manifest(out).complete
        more = sample(prompts, out, api.url, *price, "--max-cost", "100")
        assert more.exit_code == 0 and len(api.bodies) == 12 and manifest(out).complete and len(rows(out)) == 12  # nothing asked twice

        b = tmp_path / "batch"
        dry = sample(prompts, b, api.url, *price, *BATCH, "--max-cost", "10", "--dry-run")
        assert dry.exit_code == 0 and "12 requests, ~60 prompt tokens + at most 120 completion tokens, at most $18.0000" in dry.output, dry.output
        refused = sample(prompts, b, api.url, *price, *BATCH, "--max-cost", "10")
        assert refused.exit_code == 5 and "nothing was submitted" in one_error_line(refused)
        assert not api.batches and not api.uploads
        ok = sample(prompts, b, api.url, *price, *BATCH, "--max-cost", "18")
        assert ok.exit_code == 0 and len(api.batches) == 1 and len(rows(b)) == 12
        no_prices = sample(prompts, b, api.url, "--max-cost", "1")
        assert no_prices.exit_code == 2 and "max_cost needs price_input and price_output" in one_error_line(no_prices)
    finally:
        api.close()


def test_the_key_is_never_written_and_a_bad_key_stops_the_batch(tmp_path: Path) -> None:
    api, prompts = FakeAPI(key=KEY), prompts_file(tmp_path, 8)
    env = {KEY_ENV: KEY}
    try:
        good = sample(prompts, tmp_path / "good", api.url, *BATCH, "--api-key-env", KEY_ENV, "--batch-max-requests", "3", env=env)
        assert good.exit_code == 0 and len(rows(tmp_path / "good")) == 8, good.output
        bad = sample(prompts, tmp_path / "bad", api.url, *BATCH, "--api-key-env", KEY_ENV, env={KEY_ENV: KEY + "x"})
        assert bad.exit_code == 3 and "HTTP 401" in one_error_line(bad) and len(api.batches) == 3
        written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
        assert KEY.encode() not in written and KEY not in good.output + bad.output
    finally:
        api.close()


def test_request_files_for_vllm_run_batch_and_importing_its_output(tmp_path: Path) -> None:
    api, prompts = FakeAPI(seeded), prompts_file(tmp_path, 10)
    extra = ["--n", "2", "--seed", "3"]
    try:
        assert sample(prompts, tmp_path / "online", api.url, *extra).exit_code == 0
        out = tmp_path / "out"
        wrote = sample(prompts, out, api.url, *extra, "--write-requests-only", "--batch-max-requests", "6")
        assert wrote.exit_code == 0 and "wrote 2 request files" in wrote.output, wrote.output
        requests = [json.loads(x) for f in sorted((out / "requests").iterdir()) for x in f.read_text().splitlines()]
        assert len(requests) == 10 and {r["url"] for r in requests} == {"/v1/chat/completions"}

        # What `vllm run-batch -i requests.jsonl -o output.jsonl` writes (vllm.entrypoints.openai.run_batch): one
        # BatchRequestOutput per line, in any order, errors with a status code and no body.
        def vllm_line(r: dict[str, Any]) -> str:
            if r["custom_id"] == "q9":
                return json.dumps({"id": "vllm-9", "custom_id": "q9", "response": {"status_code": 400, "request_id": "vllm-batch-9", "body": None}, "error": "context too long"})
            body = seeded(r["body"], 1).body
            return json.dumps({"id": f"vllm-{r['custom_id']}", "custom_id": r["custom_id"], "response": {"status_code": 200, "request_id": "vllm-batch-x", "body": body}, "error": None})

        first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        first.write_text("".join(vllm_line(r) + "\n" for r in reversed(requests[:5])))
        second.write_text("".join(vllm_line(r) + "\n" for r in requests[3:]) + '{"custom_id": "stray", "response": {"status_code": 200}}\n')
        part = sample(prompts, out, api.url, *extra, "--from-batch-output", str(first))
        assert part.exit_code == 0 and not manifest(out).complete and len(rows(out)) == 10, part.output
        rest = sample(prompts, out, api.url, *extra, "--from-batch-output", str(second), "--from-batch-output", str(first))
        assert rest.exit_code == 0 and manifest(out).complete and "batch unknown lines" in rest.output, rest.output
        assert failures(out)["q9"]["kind"] == "http_400"
        assert samples(out) == [s for s in samples(tmp_path / "online") if not s[0].startswith("q9#")]
        assert not api.batches and len(ledger(out)) == 10
    finally:
        api.close()


def phase(call: str) -> str:
    """What a run was doing, by the last Batch API call it made: submitting (upload, create, the
    look for an unrecorded batch), polling (retrieve) or collecting (download, then commit)."""
    if call.startswith("POST") or call == "GET /v1/batches":
        return "submit"
    return "collect" if call.endswith("/content") else "poll"


@pytest.mark.slow
def test_kill_9_during_submit_poll_and_collect_never_submits_twice_nor_loses_an_answer(tmp_path: Path) -> None:
    """Runs killed at random moments, each aimed in turn at submit, poll or collect (killed within
    50 ms of entering it), rerun until done, over fresh folders until at least 22 kills; each kill
    is counted by the phase it hit (the last API call before it)."""
    rng = random.Random(24)
    api = FakeAPI(seeded, batch_fault=lambda i: BatchFault(delay_s=rng.uniform(0.0, 0.6)), lifetime_s=900)
    prompts = prompts_file(tmp_path, 48)
    phases: Counter[str] = Counter()
    try:
        for round_ in range(8):
            if sum(phases.values()) >= 22:
                break
            out = tmp_path / f"out{round_}"
            args = [sys.executable, str(REPO / "cli.py"), "teacher-sample", "--prompts", str(prompts), "--out", str(out), "--base-url", api.url, "--model", "m",
                    "--n", "2", "--seed", "5", *BATCH, "--batch-max-requests", "4"]  # fmt: skip
            for _ in range(8):
                target, calls = ("submit", "poll", "collect")[sum(phases.values()) % 3], api.batch_calls
                proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                while proc.poll() is None and (api.batch_calls == calls or phase(api.last_call) != target):
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.05))  # a random moment once the phase aimed at has begun
                if proc.poll() is not None:
                    assert proc.returncode == 0, proc.stderr.read().decode()
                    break
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                phases[phase(api.last_call)] += 1
            done = subprocess.run(args, cwd=REPO, capture_output=True, timeout=120)
            assert done.returncode == 0, done.stderr.decode()
            m = manifest(out)
            assert m.complete
            run = json.loads((out / "batch/state.json").read_text())["run"]
            per_part = {k: v for k, v in submitted(api).items() if k[0] == run}
            assert len(per_part) == 12 and max(per_part.values()) == 1  # every part submitted, none twice
            lines = ledger(out)
            assert sorted(x["prompt_id"] for x in lines) == sorted(f"q{i}" for i in range(48))  # each prompt once
            keys = [r["sample_id"] for r in rows(out)]
            assert len(keys) == len(set(keys)) == 96 == m.counts["samples"]
            assert samples(out) == samples(tmp_path / "out0")
        print("kills by phase:", dict(phases))
        assert sum(phases.values()) >= 22 and all(phases[p] >= 2 for p in ("submit", "poll", "collect")), phases
    finally:
        api.close()


def test_the_estimate_counts_prompt_tokens_with_the_tokenizer_when_given(tmp_path: Path, tiny_family: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_family.tokenizer)
    prompts = prompts_file(tmp_path, 5)
    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}] for i in range(5)]
    counted = sum(len(tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True)) for m in msgs)  # the tiny family's tokenizer has a chat template
    dry = sample(prompts, tmp_path / "out", "http://127.0.0.1:9/v1", "--system-prompt", "Be brief.", *BATCH, "--dry-run", "--tokenizer", str(tiny_family.tokenizer))
    assert dry.exit_code == 0 and f"prompt tokens by tokenizer {tiny_family.tokenizer}" in dry.output and f"~{counted:,} prompt tokens" in dry.output, dry.output
    bad = sample(prompts, tmp_path / "out", "http://127.0.0.1:9/v1", "--dry-run", "--tokenizer", str(tmp_path / "nothing"))
    assert bad.exit_code == 2 and "--tokenizer" in one_error_line(bad)
