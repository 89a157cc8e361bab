"""Benchmark the Proxy-KD student trainer against plain SFT and online white-box KD.

    python bench/train_student.py [--out bench/results/train_student.json]     # CPU: V = 151,936 and 32,768
    python bench/train_student.py --device cuda --vocab 151936 --seq 2048 --batch 2  # GPU, bf16

Same student, same tokens for every variant; each runs in its own subprocess so that its peak
RSS (and on GPU torch.cuda.max_memory_allocated) is its own:
- proxy-kd: `ProxyKDTrainer`, α = 1, top-k (k = 20) streamed from a logit cache, the loss fused
  with the output layer (no (B, L, V) logits);
- kd-alpha0: the same trainer and stream with α = 0 (vanilla black-box KD = SFT), fused too;
- proxy-kd-unfused: proxy-kd on the model's (B, L, V) logits (the reference the tests use);
- hf-sft: a plain transformers Trainer, the model's own loss on completion-only labels (it builds
  the logits);
- trl-sft: TRL's SFTTrainer on the same token ids, completion-only loss (skipped if TRL is
  not installed, as on the GPU image);
- online-kd: white-box KD with the proxy resident (about 4× the student's parameters): a proxy
  forward per batch and a dense full-vocabulary forward KL;
- online-kd-chunked: the same objective through the same fused chunking as proxy-kd (the proxy's
  logits made chunk by chunk from its hidden states): the fair online opponent.
All variants train LoRA (r = 16) on a random-init Llama; the cache holds random top-k over the
full vocabulary (its values do not change the work). Tokens/s counts input tokens per median step
after `--warmup`, best of `--rounds` interleaved runs; on CPU the ratios use tokens per CPU-second
(a shared machine's wall clock measures the neighbours too), both are printed.

Targets (issue 14), each printed PASS/MISS: at the largest vocabulary, proxy-kd peak memory
≤ 0.6× hf-sft and tokens/s ≥ 1.0× hf-sft; at every vocabulary, proxy-kd's overhead over kd-alpha0
≤ 10% in time and ≤ 5% in memory, and proxy-kd ≥ 1.5× the tokens/s of online-kd-chunked. The cache variants also time train-student's integrity
check (the manifest against its shards before training, each shard's sha256 as first opened):
≤ 3% of the training time (`integrity_share`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("proxy-kd", "kd-alpha0", "proxy-kd-unfused", "hf-sft", "trl-sft", "online-kd", "online-kd-chunked")
K = 20


def build(work: Path, a: argparse.Namespace) -> None:
    """Tokenizer, student, 4× proxy and a cache of fixed-length samples (prompt + response)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pkd.cache.codec import TopkCodec
    from pkd.fingerprint import tokenizer_fingerprint
    from pkd.cache.shards import LogitCacheWriter, LogitSample
    from pkd.records import LogitCacheManifest
    from pkd.store import Folder
    from pkd.models.tiny import default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(), 512, work / "tokenizer")
    for name, (hidden, layers, heads) in {"student": (a.hidden, a.layers, a.hidden // 64), "proxy": (2 * a.hidden, 2 * a.layers, a.hidden // 32)}.items():
        cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(2048, a.seq), tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=3)
        torch.manual_seed(0)
        with torch.device(a.device):  # random init of a GPU-sized proxy is minutes on CPU
            LlamaForCausalLM(cfg).save_pretrained(work / name)
        tok.save_pretrained(work / name)
    header = LogitCacheManifest(codec=TopkCodec(k=K, vocab_size=a.vocab).spec(), vocab_size=a.vocab, tokenizer_fingerprint=tokenizer_fingerprint(tok), proxy_fingerprint="bench", teacher_model="bench")
    writer = LogitCacheWriter(Folder(str(work / "cache")), header, shard_rows=256)
    rng = np.random.default_rng(0)
    prompt, T = a.seq // 4, a.seq - a.seq // 4
    for i in range(a.rows):
        ids = rng.integers(4, len(tok), a.seq).astype(np.int32)
        top = ((rng.integers(a.vocab, size=(T, 1)) + 7919 * np.arange(K)) % a.vocab).astype(np.int32)  # (T, k) distinct
        lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1), T)[:, :K]), axis=1)[:, ::-1].astype(np.float32)  # (T, k)
        writer.add(LogitSample(f"b{i}", ids, prompt, top, np.ascontiguousarray(lp), lp[:, 0].copy()))
    writer.close()


def run_variant(variant: str, work: Path, a: argparse.Namespace) -> dict:
    """One variant in this process: train `--steps` steps, return throughput and peaks."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

    from pkd.student.chunked import fused_head_loss
    from pkd.student.trainer import KDSettings, ProxyKDTrainer
    from pkd.cache.shards import iter_samples
    from pkd.store import Folder
    from pkd.student.data import CacheStream

    cuda = a.device == "cuda"
    if not cuda:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(work / "student", dtype=dtype)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"))
    stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time) at each step end

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if cuda:
                torch.cuda.synchronize()
            stamps.append((time.perf_counter(), time.process_time()))

    common = dict(output_dir=str(work / f"run-{variant}"), per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=1e-5, lr_scheduler_type="constant", save_strategy="no", logging_steps=a.steps, report_to="none", use_cpu=not cuda, bf16=cuda, gradient_checkpointing=a.gradient_checkpointing, seed=0)
    folder = Folder(str(work / "cache"))
    manifest = folder.read_manifest()
    rows = [{"input_ids": s.input_ids.tolist(), "completion_mask": [0] * s.response_start + [1] * s.num_tokens} for s in iter_samples(folder, manifest)]
    rows = rows * (1 + a.steps * a.batch // len(rows))
    if variant == "hf-sft":
        from datasets import Dataset
        from transformers import Trainer, default_data_collator

        labelled = [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]} for r in rows]
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=Dataset.from_list(labelled), data_collator=default_data_collator, callbacks=[Clock()])
    elif variant == "trl-sft":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        cfg = SFTConfig(**common, max_length=a.seq, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()])
    else:
        from pkd.cache.ops import check_counts, check_present, check_stats

        tick = time.perf_counter()  # what pkd.steps.train_student._open_cache runs before training
        check_present(folder, manifest)
        check_counts(folder, manifest)
        check_stats(folder, manifest)
        checked_s = time.perf_counter() - tick
        stream = CacheStream(folder, manifest, batch_size=a.batch, max_length=a.seq, shuffle_buffer=64, pad_multiple=8 if cuda else 1)
        kd = KDSettings(alpha=0.0 if variant == "kd-alpha0" else 1.0, fused=variant != "proxy-kd-unfused")
        cls = ProxyKDTrainer
        if variant == "online-kd-chunked":
            proxy = AutoModelForCausalLM.from_pretrained(work / "proxy", dtype=dtype).to(a.device).eval().requires_grad_(False)

            class ChunkedOnlineKD(ProxyKDTrainer):
                """CE + full-vocabulary KL(proxy ‖ student), both output layers fused with the
                loss: per chunk of rows the proxy's logits come from its hidden states."""

                def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
                    ids, mask = inputs["input_ids"], inputs["attention_mask"]
                    with torch.no_grad():
                        hp = proxy.model(input_ids=ids, attention_mask=mask).last_hidden_state.flatten(0, 1)  # (N, dp)
                    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True)
                    y = inputs["shift_labels"].flatten()  # (N,)
                    rows = (y != -100).nonzero().squeeze(1)  # (M,)
                    w_p = proxy.lm_head.weight  # (V, dp)

                    def chunk_loss(z, r, need_grad):  # z: (n, V) student logits of rows r
                        log_p = torch.log_softmax((hp[r] @ w_p.T).float(), -1)  # (n, V)
                        log_q = torch.log_softmax(z, -1)  # (n, V)
                        nll = -log_q.gather(1, y[r, None]).squeeze(1)
                        p = log_p.exp()
                        kl = (p * (log_p - log_q)).sum(-1)
                        grad = log_q.exp_().mul_(2).sub_(p)  # ∂(nll + kl)/∂z = 2q − p − 1[y]
                        grad.scatter_add_(1, y[r, None], torch.full_like(nll, -1.0)[:, None])
                        return nll, kl, nll + kl, grad

                    head = model.get_output_embeddings().weight
                    loss, *_ = fused_head_loss(out.hidden_states[-1], head, rows, chunk_loss, scale=1.0 / max(len(rows), 1))
                    return loss

            cls = ChunkedOnlineKD
        if variant == "online-kd":
            proxy = AutoModelForCausalLM.from_pretrained(work / "proxy", dtype=dtype).to(a.device).eval().requires_grad_(False)

            class OnlineKD(ProxyKDTrainer):
                def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
                    with torch.no_grad():
                        p = proxy(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                    s = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                    mask = inputs["shift_labels"] != -100  # (B, L)
                    s, p = s[mask].float(), p[mask].float()  # (M, V)
                    ce = F.cross_entropy(s, inputs["shift_labels"][mask])
                    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(p, -1), log_target=True, reduction="batchmean")
                    return ce + kl

            cls = OnlineKD
        trainer = cls(model=model, args=TrainingArguments(**common, remove_unused_columns=False), train_dataset=stream, processing_class=tok, callbacks=[Clock()], kd=kd)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - tick
    integrity_s = checked_s + sum(r.hash_s for r in stream.readers) if variant not in ("hf-sft", "trl-sft") else None
    steps = np.diff(np.array(stamps[a.warmup - 1 :]), axis=0)  # (timed, 2) wall and CPU seconds
    step_s, cpu_step_s = np.median(steps, axis=0).tolist()  # medians resist other processes' bursts
    return {
        "variant": variant,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens_per_s": a.batch * a.seq / step_s,
        "tokens_per_cpu_s": a.batch * a.seq / cpu_step_s,
        "step_s": step_s,
        "cpu_step_s": cpu_step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "train_s": train_s,
        "integrity_s": integrity_s,  # startup checks + sha256 of every shard opened
    }


TARGETS = {  # check: (ratio key, comparison, bound, only at the largest vocabulary)
    "memory vs hf-sft": ("memory_vs_hf-sft", "<=", 0.6, True),
    "tokens/s vs hf-sft": ("throughput_vs_hf-sft", ">=", 1.0, True),
    "time overhead vs kd-alpha0": ("time_overhead_vs_kd-alpha0", "<=", 0.10, False),
    "memory overhead vs kd-alpha0": ("memory_overhead_vs_kd-alpha0", "<=", 0.05, False),
    "tokens/s vs online-kd-chunked": ("throughput_vs_online-kd-chunked", ">=", 1.5, False),
    "integrity check share of training": ("integrity_share", "<=", 0.03, False),
}


def ratios(results: list[dict], cuda: bool) -> dict[str, float]:
    """proxy-kd against every other variant: tokens/s (CPU: per CPU-second; the wall-clock ratio
    is kept beside it) and peak memory."""
    by = {r["variant"]: r for r in results}
    rate, mem = ("tokens_per_s", "peak_gpu_mb") if cuda else ("tokens_per_cpu_s", "peak_rss_mb")
    kd = by["proxy-kd"]
    out = {}
    for v, r in by.items():
        if v != "proxy-kd":
            out[f"throughput_vs_{v}"] = kd[rate] / r[rate]
            out[f"wall_throughput_vs_{v}"] = kd["tokens_per_s"] / r["tokens_per_s"]
            out[f"memory_vs_{v}"] = kd[mem] / r[mem]
    if kd.get("integrity_s") is not None:
        out["integrity_share"] = kd["integrity_s"] / kd["train_s"]
    if "kd-alpha0" in by:
        out["time_overhead_vs_kd-alpha0"] = by["kd-alpha0"][rate] / kd[rate] - 1
        out["memory_overhead_vs_kd-alpha0"] = kd[mem] / by["kd-alpha0"][mem] - 1
    return out


def verdicts(checks: dict[int, dict[str, float]]) -> list[dict]:
    """PASS/MISS of each target at each vocabulary it applies to."""
    largest = max(checks)
    rows = []
    for vocab, c in sorted(checks.items(), reverse=True):
        for name, (key, op, bound, largest_only) in TARGETS.items():
            if key not in c or (largest_only and vocab != largest):
                continue
            ok = c[key] <= bound if op == "<=" else c[key] >= bound
            rows.append({"vocab": vocab, "target": name, "value": c[key], "bound": f"{op} {bound}", "verdict": "PASS" if ok else "MISS"})
    return rows


def print_tables(runs: dict[int, list[dict]], checks: dict[int, dict[str, float]], verdict_rows: list[dict], a: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    cuda = a.device == "cuda"
    rate, mem = ("tokens_per_s", "peak_gpu_mb") if cuda else ("tokens_per_cpu_s", "peak_rss_mb")
    for vocab, results in runs.items():
        sft = next(r for r in results if r["variant"] == "hf-sft")
        t = Table(title=f"train-student, {a.device}: V={vocab:,}, seq {a.seq}, batch {a.batch}, hidden {a.hidden}, {a.steps - a.warmup} timed steps", title_justify="left")
        for col in ("variant", "tokens/s (wall)", "tokens/CPU-s", "× hf-sft (CPU)", "× hf-sft (wall)", mem, "× hf-sft mem"):
            t.add_column(col, justify="left" if col == "variant" else "right")
        for r in results:
            t.add_row(r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_cpu_s']:,.0f}", f"{r[rate] / sft[rate]:.2f}", f"{r['tokens_per_s'] / sft['tokens_per_s']:.2f}", f"{r[mem]:,.0f}", f"{r[mem] / sft[mem]:.2f}")
        console.print(t)
    t = Table(title="issue 14 targets for proxy-kd (ratios by " + rate + ")", title_justify="left")
    for col in ("V", "target", "value", "bound", "verdict"):
        t.add_column(col)
    for v in verdict_rows:
        t.add_row(f"{v['vocab']:,}", v["target"], f"{v['value']:.2f}", v["bound"], v["verdict"])
    console.print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--vocab", default="151936,32768", help="comma-separated vocabulary sizes, each a separate set of runs")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per variant (1: CPU time is not inflated by idle-spinning workers)")
    p.add_argument("--rounds", type=int, default=1, help="run all variants this many times, interleaved; keep each one's best")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="bench/results/train_student.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    vocabs = [int(v) for v in a.vocab.split(",")]
    if a.child:
        a.vocab = vocabs[0]
        print("RESULT " + json.dumps(run_variant(a.child, Path(a.work), a)), flush=True)
        return
    variants = [v for v in a.variants.split(",") if v != "trl-sft" or _has("trl")]
    runs: dict[int, list[dict]] = {}
    for vocab in vocabs:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            a.vocab = vocab
            build(work, a)
            best: dict[str, dict] = {}
            for variant in [v for _ in range(a.rounds) for v in variants]:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--child", variant, "--work", str(work), "--vocab", str(vocab)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(line[7:])
                print(f"V={vocab}: {variant}: {r['tokens_per_s']:,.0f} tokens/s, {r['tokens_per_cpu_s']:,.0f} tokens/CPU-s, {r['peak_rss_mb']:,.0f} MB", flush=True)
                old = best.setdefault(variant, r)
                for key in ("tokens_per_s", "tokens_per_cpu_s"):
                    old[key] = max(old[key], r[key])
            runs[vocab] = [best[v] for v in variants]
    a.vocab = ",".join(map(str, vocabs))
    checks = {v: ratios(results, a.device == "cuda") for v, results in runs.items()}
    verdict_rows = verdicts(checks)
    print_tables(runs, checks, verdict_rows, a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: v for k, v in vars(a).items() if k not in ("child", "work")}, "results": {str(v): r for v, r in runs.items()}, "checks": {str(v): c for v, c in checks.items()}, "targets": verdict_rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
