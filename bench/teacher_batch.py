"""The same prompt set through `pkd teacher-sample` online and with `--batch`, against the test
server (tests/fake_api.py: an OpenAI-compatible chat endpoint and Batch API on 127.0.0.1 that runs
each batch line through the same chat handler, answers depending on the request's seed).

    python bench/teacher_batch.py [--prompts 200] [--n 2] [--batch-max-requests 50] [--delay 0]

Per mode: chat requests the server answered, Batch API calls, prompt and completion tokens (the
manifest's usage sums), files written to the output folder, wall time; and whether the two folders
hold the same samples (ids, messages, responses, usage). What it shows is the plumbing, not the
provider: a real batch takes minutes to hours at half the price, the test server's takes
milliseconds. Writes bench/results/teacher_batch.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def samples(out: Path) -> list[tuple[Any, ...]]:
    import pyarrow.parquet as pq

    from pkd.store import Folder

    m = Folder(str(out)).read_manifest()
    rows = [r for f in m.files if f.path.endswith(".parquet") for r in pq.read_table(out / f.path).to_pylist()]
    return sorted((r["sample_id"], json.dumps(r["messages"]), r["response"], json.dumps(r["usage"])) for r in rows)


def run(mode: str, api: Any, prompts: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pkd.config import load_recipe, override
    from pkd.steps.teacher_sample import run_teacher_sample

    flags = dict(prompts=str(prompts), out=str(out), base_url=api.url, model="m", n=args.n, seed=0, concurrency=args.concurrency, mode=mode,
                 batch_max_requests=args.batch_max_requests, poll_interval_s=0.05)  # fmt: skip
    recipe = override(load_recipe(), "teacher_sample", flags)
    chat, calls = len(api.bodies), api.batch_calls
    start = time.perf_counter()
    s = run_teacher_sample(recipe.teacher_sample, recipe.run, progress=False)
    wall = time.perf_counter() - start
    files = [p for p in out.rglob("*") if p.is_file()]
    return {
        "mode": mode, "chat_requests": len(api.bodies) - chat, "batch_api_calls": api.batch_calls - calls, "batches": len(api.batches) if mode == "batch" else 0,
        "prompts_done": s.counts["prompts_done"], "samples": s.counts["samples"], "prompt_tokens": s.counts["prompt_tokens"], "completion_tokens": s.counts["completion_tokens"],
        "files_written": len(files), "bytes_written": sum(p.stat().st_size for p in files), "wall_s": round(wall, 3),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch-max-requests", type=int, default=50)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds the server takes per chat request")
    ap.add_argument("--out", default="bench/results/teacher_batch.json")
    args = ap.parse_args()

    from fake_api import FakeAPI, Reply, completion, last_user
    from rich.console import Console
    from rich.table import Table

    def seeded(body: dict[str, Any], attempt: int) -> Reply:
        return Reply(200, completion(body, [f"{last_user(body)} seed {body.get('seed')} #{i}" for i in range(body.get("n", 1))]))

    api = FakeAPI(seeded, delay_s=args.delay, max_requests=10 * args.prompts, lifetime_s=3600)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: what is {i} + {i}?"}) + "\n" for i in range(args.prompts)))
            online = run("online", api, prompts, Path(tmp) / "online", args)
            batch = run("batch", api, prompts, Path(tmp) / "batch", args)
            equal = samples(Path(tmp) / "online") == samples(Path(tmp) / "batch")
    finally:
        api.close()

    table = Table(title=f"{args.prompts} prompts × n={args.n}", title_justify="left")
    table.add_column("")
    for mode in ("online", "batch"):
        table.add_column(mode, justify="right")
    for key in online:
        if key != "mode":
            table.add_row(key.replace("_", " "), f"{online[key]:,}", f"{batch[key]:,}")
    table.caption = f"online vs --batch against the test server; output equal: {equal}"
    Console(width=120).print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "online": online, "batch": batch, "output_equal": equal}, indent=2) + "\n")


if __name__ == "__main__":
    main()
