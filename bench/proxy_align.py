"""Where an alignment round's time goes, with vLLM (base + LoRA adapter, and the adapter merged
into the base), and transformers sampling side by side on one real model (SmolLM2-135M-Instruct,
CPU unless a GPU is present).

One `pkd proxy-align` run per variant, same data and settings: no warm-up (a fresh LoRA), one
round over PROMPTS prompts. Reported per variant: generation wall time (child process + merge +
engine start + sampling), the merge, engine start, pure sampling time and tokens/s, tokens/s over
the whole generation wall, the sampling process's CPU seconds, reference log-probs, training.
Targets, each printed PASS/MISS: merged vLLM ≥ 1.0× transformers tokens/s (sampling, and over
the generation wall, merge included); vLLM ≥ 3× transformers sampling tokens/s (the variant that
`sample_merged = "auto"` picks here).

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

from pkd.align.sample import merges_adapter
from pkd.config import Recipe, override
from pkd.engines import vllm_on_cpu
from pkd.models.gguf import convert_gguf, smollm2_gguf_path
from pkd.records import Manifest
from pkd.teacher.splits import split_of
from pkd.steps.proxy_align import run_proxy_align
from pkd.teacher.samples import Outcome, Writer
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


def one_round(engine: str, sample_merged: str, prompts: int, max_new_tokens: int) -> dict:
    out = WORK / f"proxy-{engine}-{sample_merged}"
    shutil.rmtree(out, ignore_errors=True)
    values = dict(
        teacher=str(WORK / "teacher"), model=str(MODEL_DIR), out=str(out), lora_r=16, lora_alpha=32, lora_dropout=0.0,
        learning_rate=1e-4, per_device_batch_size=8, warmup_epochs=0, epochs=1, max_length=128, rounds=1,
        chunk_size=prompts, engine=engine, sample_merged=sample_merged, temperature=1.0, max_new_tokens=max_new_tokens,
        eval_samples=4, logging_steps=1,
    )  # fmt: skip
    start = time.monotonic()
    summary = run_proxy_align(override(Recipe(), "proxy_align", values))
    r = next(s for s in summary.report["stages"] if s["stage"] == "round-01")
    sampling = json.loads((out / "round-01" / "sampling.json").read_text())
    variant = "hf + adapter" if engine == "hf" else ("vllm merged" if r["merged"] else "vllm + adapter")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "variant": variant, "engine": engine, "merged": r["merged"], "prompts": prompts, "pairs": r["pairs"], "new_tokens": r["new_tokens"],
        "gen_wall_s": r["gen_s"], "merge_s": r["merge_s"] or 0.0, "engine_load_s": r["load_s"], "sampling_s": r["generate_s"],
        "sampling_cpu_s": sampling["cpu_s"], "sampling_tokens_per_s": r["new_tokens"] / r["generate_s"],
        "wall_tokens_per_s": r["new_tokens"] / r["gen_s"], "ref_logps_s": r["ref_s"], "train_s": r["train_s"],
        "train_steps": r["steps"], "run_s": time.monotonic() - start,
    }  # fmt: skip


def verdicts(by: dict[str, dict], auto_merges: bool) -> list[dict]:
    """The targets, each with its ratio and PASS/MISS."""
    merged, adapter, hf = by["vllm merged"], by["vllm + adapter"], by["hf + adapter"]
    auto = merged if auto_merges else adapter
    rows = [
        ("vllm merged ≥ 1.0× hf sampled tokens/s", merged["sampling_tokens_per_s"] / hf["sampling_tokens_per_s"], 1.0),
        ("vllm merged ≥ 1.0× hf tokens/s over the generation wall", merged["wall_tokens_per_s"] / hf["wall_tokens_per_s"], 1.0),
        (f"{auto['variant']} (auto) ≥ 3× hf sampled tokens/s", auto["sampling_tokens_per_s"] / hf["sampling_tokens_per_s"], 3.0),
    ]
    return [{"target": t, "ratio": v, "verdict": "PASS" if v >= bound else "MISS"} for t, v, bound in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts in the round (one proxy sample each)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    convert_gguf(smollm2_gguf_path(), MODEL_DIR)  # no-op when already converted
    WORK.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK / "teacher", ignore_errors=True)
    teacher_samples(WORK / "teacher", n=int(args.prompts / RATIOS[1]) + 8)
    rows = [one_round(engine, merge, args.prompts, args.max_new_tokens) for engine, merge in (("vllm", "never"), ("vllm", "always"), ("hf", "never"))]
    by = {r["variant"]: r for r in rows}
    auto_merges = merges_adapter("auto", vllm_on_cpu())
    checks = verdicts(by, auto_merges)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    t = Table(title=f"proxy-align round on SmolLM2-135M-Instruct + LoRA r16, {args.prompts} prompts × ≤{args.max_new_tokens} new tokens, {device}", title_justify="left")
    cols = ("variant", "gen wall s", "merge s", "start s", "sampling s", "sampling CPU-s", "sampled tok/s", "tok/s (gen wall)", "ref logps s", "train s", "pairs")
    for col in cols:
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        t.add_row(r["variant"], f"{r['gen_wall_s']:.1f}", f"{r['merge_s']:.1f}", f"{r['engine_load_s']:.1f}", f"{r['sampling_s']:.1f}", f"{r['sampling_cpu_s']:.1f}",
                  f"{r['sampling_tokens_per_s']:.0f}", f"{r['wall_tokens_per_s']:.1f}", f"{r['ref_logps_s']:.1f}", f"{r['train_s']:.1f}", str(r["pairs"]))  # fmt: skip
    t.caption = (
        "gen wall: the round's generation wall time (vLLM: child process, merge, engine start, sampling); sampling CPU-s: the "
        f"sampling process's CPU seconds over merge + start + sampling. sample_merged = auto here: {'merged' if auto_merges else 'adapter'}"
    )
    console = Console(width=160)
    console.print(t)
    for c in checks:
        console.print(f"{c['verdict']}  {c['target']}: {c['ratio']:.2f}×")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "model": str(MODEL_DIR), "args": vars(args), "rounds": rows, "auto_merges": auto_merges, "targets": checks}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
