"""Benchmark `pkd teacher-sample` against the two obvious ways of calling a chat API.

    python bench/teacher_sample.py [--prompts 128] [--concurrency 16] [--max-tokens 32]

Throughput: a real vLLM server (CPU) over the tiny teacher of `pkd.models.tiny` (built once under
cache/bench/tiny-family), the same prompts for every contender, after a warm-up pass over all of
them so that no contender profits from a warmer prefix cache:
- sequential: one synchronous `openai.OpenAI` request after the other;
- gather: `asyncio.gather` over every prompt at once with `openai.AsyncOpenAI` (unbounded);
- pkd: `run_teacher_sample` (bounded concurrency, retry policy, shards, manifest), writing to a
  temporary folder.
Client overhead: the same three against a trivial server in another process that answers every
request instantly with a canned completion; ms/request = client-process CPU time / requests
(server time excluded), plus wall time per request for pkd at concurrency 1.
Writes bench/results/teacher_sample.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_THROUGHPUT, TARGET_OVERHEAD_MS = 0.9, 2.0
CANNED = json.dumps({
    "id": "x", "object": "chat.completion", "created": 0, "model": "instant",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()  # fmt: skip
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(CANNED), CANNED)


async def _instant(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
            writer.write(RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def serve_instant(port: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_instant, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    asyncio.run(main())


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"instant server did not listen on {port}")


def _prompts_file(n: int, folder: Path) -> tuple[Path, list[str]]:
    from pkd.models.tiny import synthetic_tasks

    texts = [f"{q} (#{i})" for i, (q, _a) in enumerate(synthetic_tasks(n, seed=1))]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path, texts


def sequential(base_url: str, model: str, texts: list[str], max_tokens: int) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600.0)
    for t in texts:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": t}], max_completion_tokens=max_tokens, seed=0)
    return len(texts)


def gather(base_url: str, model: str, texts: list[str], max_tokens: int) -> int:
    async def main() -> int:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600.0)  # 600 s connect too: thousands of connections at once are slow to open
        msgs = [[{"role": "user", "content": t}] for t in texts]
        out = await asyncio.gather(*(client.chat.completions.create(model=model, messages=m, max_completion_tokens=max_tokens, seed=0) for m in msgs))
        await client.close()
        return len(out)

    return asyncio.run(main())


def pkd_run(base_url: str, model: str, prompts: Path, max_tokens: int, concurrency: int) -> int:
    from pkd.config import load_recipe, override
    from pkd.steps.teacher_sample import run_teacher_sample

    with tempfile.TemporaryDirectory() as out:
        flags = dict(prompts=str(prompts), out=out, base_url=base_url, model=model, n=1, max_tokens=max_tokens, seed=0, concurrency=concurrency, shard_size=1000, keep_truncated=True)
        recipe = override(load_recipe(), "teacher_sample", flags)
        s = run_teacher_sample(recipe.teacher_sample, recipe.run, progress=False)
        return s.session["samples"] + s.session.get("dropped_empty", 0) + s.session.get("dropped_duplicate", 0)


def timed(fn, *args) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    n = fn(*args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"responses": n, "wall_s": wall, "responses_per_s": n / wall, "client_cpu_ms_per_request": 1e3 * cpu / n, "wall_ms_per_request": 1e3 * wall / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--overhead-requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16, help="pkd's, = the server's max-num-seqs")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results/teacher_sample.json")
    ap.add_argument("--serve-instant", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_instant:
        return serve_instant(args.serve_instant)

    from rich.console import Console
    from rich.table import Table

    from pkd.engines.serve import free_port, vllm_server
    from pkd.models.tiny import build_family

    console = Console(width=120)
    results: dict[str, dict] = {"overhead": {}, "throughput": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # client overhead against an instant server in another process
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve-instant", str(port)])
        try:
            _wait_port(port)
            url = f"http://127.0.0.1:{port}/v1"
            prompts, texts = _prompts_file(args.overhead_requests, Path(tmp))
            console.print(f"[bold]overhead[/]: {len(texts)} requests against an instant server")
            sequential(url, "instant", texts[:50], 1)  # warm the imports
            results["overhead"]["sequential"] = timed(sequential, url, "instant", texts, 1)
            results["overhead"]["gather"] = timed(gather, url, "instant", texts, 1)
            results["overhead"]["pkd c=1"] = timed(pkd_run, url, "instant", prompts, 1, 1)
            results["overhead"][f"pkd c={args.concurrency}"] = timed(pkd_run, url, "instant", prompts, 1, args.concurrency)
        finally:
            server.kill()
            server.wait()

        # throughput against the tiny vLLM teacher
        family = build_family("cache/bench/tiny-family", seed=0)
        prompts, texts = _prompts_file(args.prompts, Path(tmp))
        console.print(f"[bold]throughput[/]: {len(texts)} prompts x {args.max_tokens} tokens, tiny vLLM teacher (CPU), max-num-seqs {args.concurrency}")
        with vllm_server(family.teacher, served_model_name="teacher", dtype="float32", max_num_seqs=args.concurrency) as srv:
            gather(srv.base_url, "teacher", texts, 1)  # warm-up: every prompt once, equal prefix cache for all
            results["throughput"]["sequential"] = timed(sequential, srv.base_url, "teacher", texts, args.max_tokens)
            results["throughput"]["gather"] = timed(gather, srv.base_url, "teacher", texts, args.max_tokens)
            results["throughput"]["pkd"] = timed(pkd_run, srv.base_url, "teacher", prompts, args.max_tokens, args.concurrency)

    tp = results["throughput"]
    best = max(tp["sequential"]["responses_per_s"], tp["gather"]["responses_per_s"])
    ratio = tp["pkd"]["responses_per_s"] / best
    overhead = max(v["client_cpu_ms_per_request"] for k, v in results["overhead"].items() if k.startswith("pkd"))
    results["summary"] = {
        "pkd_vs_best_baseline": ratio, "throughput_target": TARGET_THROUGHPUT, "throughput_ok": ratio >= TARGET_THROUGHPUT,
        "pkd_client_overhead_ms": overhead, "overhead_target_ms": TARGET_OVERHEAD_MS, "overhead_ok": overhead <= TARGET_OVERHEAD_MS,
        "cpu_count": os.cpu_count(), "args": vars(args),
    }  # fmt: skip
    table = Table(title="teacher-sample benchmark", title_justify="left")
    for col in ("part", "client", "responses", "wall s", "responses/s", "client CPU ms/req", "wall ms/req"):
        table.add_column(col, justify="left" if col in ("part", "client") else "right")
    for part in ("throughput", "overhead"):
        for name, r in results[part].items():
            table.add_row(part, name, str(r["responses"]), f"{r['wall_s']:.2f}", f"{r['responses_per_s']:.1f}", f"{r['client_cpu_ms_per_request']:.2f}", f"{r['wall_ms_per_request']:.2f}")
    console.print(table)
    ok = lambda b: "[green]ok[/]" if b else "[red]missed[/]"  # noqa: E731
    console.print(f"pkd / best baseline throughput: {ratio:.2f}x (target >= {TARGET_THROUGHPUT}) {ok(ratio >= TARGET_THROUGHPUT)}")
    console.print(f"pkd client overhead: {overhead:.2f} ms/request CPU (target <= {TARGET_OVERHEAD_MS}) {ok(overhead <= TARGET_OVERHEAD_MS)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
