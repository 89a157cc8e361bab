"""Where an alignment round's time goes, with the vLLM and transformers sampling engines side by
side on one real model (SmolLM2-135M-Instruct, CPU unless a GPU is present).

One `pkd proxy-align` run per engine, same data and settings: no warm-up (a fresh LoRA), one
round over PROMPTS prompts. Reported per engine: generation wall time (child process + engine
start + sampling), pure sampling time and tokens/s, reference log-probs, training. Target: vLLM
samples ≥ 3× faster than transformers (tokens/s).

    python bench/proxy_align.py [--prompts 16] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pkd.config import Recipe, override
from pkd.models.gguf import convert_gguf, smollm2_gguf_path
from pkd.records import Manifest
from pkd.teacher.splits import split_of
from pkd.steps.proxy_align import run_proxy_align
from pkd.steps.teacher_sample import Outcome, Writer
from pkd.store import Folder
from pkd.models.tiny import synthetic_tasks

MODEL_DIR = Path("cache/bench/smollm2/hf")
WORK = Path("cache/bench/proxy_align")
RESULTS = Path("bench/results/proxy_align.json")
RATIOS = (0.05, 0.9, 0.05)  # nearly everything in D_p: the round is what is measured


def teacher_samples(out: Path, n: int) -> None:
    """Exact answers to the synthetic tasks, written through teacher-sample's own writer."""
    writer = Writer(Folder(str(out)), Manifest(kind="teacher", inputs={"prompts": f"bench-{n}"}), [], shard_size=1000)
    for i, (prompt, answer) in enumerate(synthetic_tasks(n, seed=1)):
        pid = f"bench-{i:05d}"
        row = {
            "sample_id": f"{pid}#0", "prompt_id": pid, "sample_index": 0, "split": split_of(pid, RATIOS),
            "messages": [{"role": "user", "content": prompt}], "response": answer, "finish_reason": "stop",
            "usage": None, "latency_s": 0.0, "teacher": "exact", "reference": answer, "logprobs": None,
        }  # fmt: skip
        writer.add(Outcome(rows=[row], ledger={"prompt_id": pid, "status": "ok", "samples": 1, "attempts": 1}))
    writer.flush(complete=True)


def one_round(engine: str, prompts: int, max_new_tokens: int) -> dict:
    out = WORK / f"proxy-{engine}"
    shutil.rmtree(out, ignore_errors=True)
    values = dict(
        teacher=str(WORK / "teacher"), model=str(MODEL_DIR), out=str(out), lora_r=16, lora_alpha=32, lora_dropout=0.0,
        learning_rate=1e-4, per_device_batch_size=8, warmup_epochs=0, epochs=1, max_length=128, rounds=1,
        chunk_size=prompts, engine=engine, temperature=1.0, max_new_tokens=max_new_tokens, eval_samples=4, logging_steps=1,
    )  # fmt: skip
    start = time.monotonic()
    summary = run_proxy_align(override(Recipe(), "proxy_align", values))
    r = next(s for s in summary.report["stages"] if s["stage"] == "round-01")
    return {
        "engine": engine, "prompts": prompts, "pairs": r["pairs"], "new_tokens": r["new_tokens"],
        "gen_wall_s": r["gen_s"], "engine_load_s": r["load_s"], "sampling_s": r["generate_s"],
        "sampling_tokens_per_s": r["new_tokens"] / r["generate_s"], "ref_logps_s": r["ref_s"], "train_s": r["train_s"],
        "train_steps": r["steps"], "run_s": time.monotonic() - start,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts in the round (one proxy sample each)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    convert_gguf(smollm2_gguf_path(), MODEL_DIR)  # no-op when already converted
    WORK.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK / "teacher", ignore_errors=True)
    teacher_samples(WORK / "teacher", n=int(args.prompts / RATIOS[1]) + 8)
    rows = [one_round(engine, args.prompts, args.max_new_tokens) for engine in ("vllm", "hf")]
    speedup = rows[0]["sampling_tokens_per_s"] / rows[1]["sampling_tokens_per_s"]

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    t = Table(title=f"proxy-align round on SmolLM2-135M-Instruct, {args.prompts} prompts × ≤{args.max_new_tokens} new tokens, {device}", title_justify="left")
    for col in ("engine", "generation wall s", "engine start s", "sampling s", "sampled tok/s", "ref logps s", "train s", "steps", "pairs"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        t.add_row(r["engine"], f"{r['gen_wall_s']:.1f}", f"{r['engine_load_s']:.1f}", f"{r['sampling_s']:.1f}", f"{r['sampling_tokens_per_s']:.0f}",
                  f"{r['ref_logps_s']:.1f}", f"{r['train_s']:.1f}", str(r["train_steps"]), str(r["pairs"]))  # fmt: skip
    t.caption = f"vLLM samples {speedup:.1f}× faster than transformers (target ≥ 3×); generation wall includes the vLLM child process start"
    Console().print(t)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": device, "model": str(MODEL_DIR), "args": vars(args), "rounds": rows, "vllm_speedup": speedup}, indent=2) + "\n")


if __name__ == "__main__":
    main()
