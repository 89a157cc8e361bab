"""The alignment study: what `pkd proxy-align` does to the toy proxy's skill, stage by stage and
recipe by recipe, measured on the proxy side only (no student is trained here).

Each variant is one `pkd proxy-align` run on the demo's teacher samples with the toy recipe plus
the variant's flags (`--select last`, so every stage is kept and reported). Every stage is
measured on the same EVAL_SAMPLES held-out teacher samples of D_s: teacher NLL per token, top-1
agreement with the teacher's tokens, and greedy exact match against the prompts' correct
answers. The table has one row per (variant, stage); the JSON has every figure.

    python bench/align_study.py                      # every variant, two at a time
    python bench/align_study.py --only toy-recipe,full-ft   # some of them
    python bench/align_study.py --world DIR --teacher DIR  # other inputs (default: the demo's)

It needs the demo's world and teacher samples (`make demo`, or `pkd demo` once); it samples the
teacher itself (vLLM on 127.0.0.1, as the demo does) when the samples are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEMO = Path("cache/demo/full")
WORK = Path("cache/bench/align_study")
RESULTS = Path("bench/results/align_study.json")
EVAL_SAMPLES = 200

# The study's variants change the toy recipe as it was before the study (lr 3e-3, 2 warm-up
# epochs): BEFORE comes first on every command line, so a variant's own flags override it (the
# last value of an option wins). `chosen` is recipes/toy.toml as it is now.
BEFORE = ["--lr", "3e-3", "--warmup-epochs", "2"]

# (name, what it changes, flags over BEFORE)
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("toy-recipe", "the toy recipe before the study (lr 3e-3, 2 warm-up epochs)", []),
    ("chosen", "recipes/toy.toml now (lr 6e-4, 8 warm-up epochs)", ["--lr", "6e-4", "--warmup-epochs", "8"]),
    ("lr-1e-3", "learning rate 1e-3 (recipe 3e-3)", ["--lr", "1e-3"]),
    ("lr-3e-4", "learning rate 3e-4", ["--lr", "3e-4"]),
    ("warmup-1ep", "1 warm-up epoch (recipe 2)", ["--warmup-epochs", "1"]),
    ("warmup-4ep", "4 warm-up epochs", ["--warmup-epochs", "4"]),
    ("warmup-8ep", "8 warm-up epochs", ["--warmup-epochs", "8"]),
    ("w4-lr-1e-3", "4 warm-up epochs, lr 1e-3", ["--warmup-epochs", "4", "--lr", "1e-3"]),
    ("w8-lr-1e-3", "8 warm-up epochs, lr 1e-3", ["--warmup-epochs", "8", "--lr", "1e-3"]),
    ("w4-beta-0.5", "4 warm-up epochs, DPO β 0.5", ["--warmup-epochs", "4", "--beta", "0.5"]),
    ("w8-lr-3e-4", "8 warm-up epochs, lr 3e-4", ["--warmup-epochs", "8", "--lr", "3e-4"]),
    ("w16-lr-3e-4", "16 warm-up epochs, lr 3e-4", ["--warmup-epochs", "16", "--lr", "3e-4"]),
    ("w4-lr-6e-4", "4 warm-up epochs, lr 6e-4", ["--warmup-epochs", "4", "--lr", "6e-4"]),
    ("w8-lr-6e-4", "8 warm-up epochs, lr 6e-4", ["--warmup-epochs", "8", "--lr", "6e-4"]),
    ("w16-lr-2e-4", "16 warm-up epochs, lr 2e-4", ["--warmup-epochs", "16", "--lr", "2e-4"]),
    ("w32-lr-1e-4", "32 warm-up epochs, lr 1e-4", ["--warmup-epochs", "32", "--lr", "1e-4"]),
    ("attn-w16-lr-3e-4", "16 warm-up epochs, lr 3e-4, LoRA on attention only", ["--warmup-epochs", "16", "--lr", "3e-4", "--lora-target", "q_proj,k_proj,v_proj,o_proj"]),
    ("attn-w8-lr-1e-3", "8 warm-up epochs, lr 1e-3, LoRA on attention only", ["--warmup-epochs", "8", "--lr", "1e-3", "--lora-target", "q_proj,k_proj,v_proj,o_proj"]),
    ("w16-lr-3e-4-b0.5", "16 warm-up epochs, lr 3e-4, DPO β 0.5", ["--warmup-epochs", "16", "--lr", "3e-4", "--beta", "0.5"]),
    ("w4-ep1", "4 warm-up epochs, 1 epoch a round (recipe 2)", ["--warmup-epochs", "4", "--epochs", "1"]),
    ("w8-lr-1e-3-ep1", "8 warm-up epochs, lr 1e-3, 1 epoch a round", ["--warmup-epochs", "8", "--lr", "1e-3", "--epochs", "1"]),
    ("no-warmup", "no warm-up: DPO + NLL rounds only", ["--warmup-epochs", "0"]),
    ("lora-r32", "LoRA rank 32 (recipe 8)", ["--lora-r", "32", "--lora-alpha", "64"]),
    ("lora-attn", "LoRA on attention only (q,k,v,o)", ["--lora-target", "q_proj,k_proj,v_proj,o_proj"]),
    ("lora-mlp", "LoRA on the MLP only", ["--lora-target", "gate_proj,up_proj,down_proj"]),
    ("full-3e-4", "full fine-tuning, lr 3e-4", ["--full", "--lr", "3e-4"]),
    ("full-1e-4", "full fine-tuning, lr 1e-4", ["--full", "--lr", "1e-4"]),
    ("beta-0.5", "DPO β 0.5 (recipe 0.1)", ["--beta", "0.5"]),
    ("nll-0", "no NLL term in the rounds (DPO alone)", ["--nll-weight", "0"]),
    ("nll-0.2", "NLL term weight 0.2", ["--nll-weight", "0.2"]),
    ("rounds-6", "6 rounds (recipe 3)", ["--rounds", "6"]),
    ("chunk-64", "64 prompts a round (recipe 32)", ["--chunk-size", "64"]),
]


def teacher_samples(world: Path, teacher: Path) -> None:
    """The demo's teacher samples, sampled now if missing (the demo's own step)."""
    if (teacher / "manifest.json").is_file():
        return
    from pkd.toy.demo import DemoPaths, _Steps
    from pkd.toy.world import build_world

    paths = DemoPaths(teacher.parent.parent)
    paths.run.mkdir(parents=True, exist_ok=True)
    _Steps(paths, build_world(world), quick=False, say=print).teacher_sample()


def run_variant(name: str, flags: list[str], world: Path, teacher: Path, seed: int, proxy: Path, work: Path) -> dict:
    out = work / (name if seed == 0 else f"{name}-seed{seed}")
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        sys.executable, "-m", "pkd.cli", "proxy-align", "--model", str(proxy), "--student", str(world / "student"),
        "--teacher", str(teacher), "--out", str(out), "--seed", str(seed), "--eval-samples", str(EVAL_SAMPLES),
        "--select", "last", "--report-to", "none", "--json", *BEFORE, *flags,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    start = time.monotonic()
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        raise SystemExit(f"{name}: proxy-align failed (exit {code}), see {log}")
    report = json.loads((out / "report.json").read_text())
    return {"name": name, "flags": flags, "wall_s": round(time.monotonic() - start, 1), "stages": report["stages"], "heldout": report["heldout"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=DEMO / "world")
    ap.add_argument("--teacher", type=Path, default=DEMO / "run" / "teacher")
    ap.add_argument("--proxy", type=Path, help="the proxy to align (default: the world's)")
    ap.add_argument("--work", type=Path, default=WORK, help="where the runs go")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    chosen = [v for v in VARIANTS if not args.only or v[0] in args.only.split(",")]
    if not chosen:
        raise SystemExit(f"--only {args.only!r}: no such variant; choose from {', '.join(v[0] for v in VARIANTS)}")
    proxy = args.proxy or args.world / "proxy"
    teacher_samples(args.world, args.teacher)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda v: run_variant(v[0], v[2], args.world, args.teacher, args.seed, proxy, args.work), chosen))

    table = Table(title=f"proxy-align study: {EVAL_SAMPLES} held-out D_s teacher samples, seed {args.seed}", title_justify="left")
    for col in ("variant", "stage", "exact match", "NLL/token", "top-1"):
        table.add_column(col, justify="left" if col in ("variant", "stage") else "right")
    for (name, what, _), r in zip(chosen, results, strict=True):
        for i, st in enumerate(r["stages"]):
            if name != chosen[0][0] and st["stage"] == "base":
                continue  # the base proxy is the same in every run
            em = "-" if st.get("exact_match") is None else f"{100 * st['exact_match']:.1f}%"
            table.add_row(f"{name}: {what}" if i <= 1 else "", st["stage"], em, f"{st['nll_per_token']:.4f}", f"{100 * st['top1_agreement']:.1f}%")
    Console(width=160).print(table)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "host": platform.node(), "proxy": str(proxy), "seed": args.seed, "eval_samples": EVAL_SAMPLES, "wall_s": round(time.monotonic() - start, 1),
        "variants": [{"what": what} | r for (_, what, _), r in zip(chosen, results, strict=True)],
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
