"""Transformers-engine scoring vs a plain forward at a realistic size, one device: tokens/s and
peak memory (torch.cuda.max_memory_allocated, over the weights) of each.

Model: a random-init Llama of ~1.0 B parameters (hidden 2048, 16 layers, 32 heads / 8 KV heads,
MLP 5632, tied embeddings) with Qwen's 151,936-token vocabulary, bf16; sequences of 1024 tokens
whose last 3/4 are the "response" scored with top-20. The plain forward is what a trainer would
run: `model(input_ids).logits` over every position, in the same batches (batch_tokens / seq
sequences). The engine keeps only the response positions' logits and takes log_softmax in
float32 one sequence at a time. Weights are random: speed and memory do not depend on them.

    python bench/gpu_cache_logits.py                 # GPU, realistic size (bench/gpu_cache_logits.sh)
    python bench/gpu_cache_logits.py --tiny          # CPU, toy size: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REAL = dict(vocab=151936, hidden=2048, layers=16, heads=32, kv_heads=8, mlp=5632, seq=1024, sequences=64, batch_tokens=8192, dtype="bfloat16")
TINY = dict(vocab=1024, hidden=64, layers=2, heads=2, kv_heads=2, mlp=128, seq=64, sequences=8, batch_tokens=256, dtype="float32")


def build_model(out: Path, size: dict, device: str) -> int:
    """Save a random-init Llama (and a small tokenizer: the engine reads only eos/pad from it)
    under `out`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pkd.models.tiny import default_corpus, train_tokenizer

    train_tokenizer(default_corpus(50), 300, out)
    config = LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"], intermediate_size=size["mlp"], max_position_embeddings=max(2048, size["seq"]),
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    dtype = getattr(torch, size["dtype"])
    with torch.device(device):  # initialise where it is fast
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_over(base: int, device: str) -> float | None:
    """GiB allocated at the peak beyond `base` bytes (None off the GPU)."""
    import torch

    return (torch.cuda.max_memory_allocated() - base) / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> int:
    import torch

    if not device.startswith("cuda"):
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def plain_forward(model_dir: Path, seqs: list[list[int]], size: dict, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, size["dtype"])).to(device).eval()
    per_batch = max(1, size["batch_tokens"] // size["seq"])
    batches = [torch.tensor(seqs[i : i + per_batch], device=device) for i in range(0, len(seqs), per_batch)]  # (B, seq) each
    with torch.inference_mode():
        model(batches[0]).logits  # warm-up
        base = reset_peak(device)
        sync(device)
        start = time.perf_counter()
        for ids in batches:
            model(ids).logits  # (B, seq, V)
        sync(device)
        seconds = time.perf_counter() - start
    peak = peak_over(base, device)
    del model
    reset_peak(device)
    return {"variant": "plain forward (all logits)", "seconds": seconds, "peak_gib_over_weights": peak}


def engine_scoring(model_dir: Path, seqs: list[list[int]], size: dict, device: str, k: int) -> dict:
    from pkd.engines import load_engine

    starts = [size["seq"] // 4] * len(seqs)
    with load_engine("hf", model_dir, dtype=size["dtype"], device=device, batch_tokens=size["batch_tokens"], max_logprobs=k) as engine:
        list(engine.score_topk(seqs[:2], starts[:2], k))  # warm-up
        base = reset_peak(device)
        sync(device)
        start = time.perf_counter()
        results = list(engine.score_topk(seqs, starts, k))
        sync(device)
        seconds = time.perf_counter() - start
        peak = peak_over(base, device)
    assert all(r.topk_ids.shape == (size["seq"] - size["seq"] // 4, k) for r in results)
    return {"variant": f"HF engine score_topk (k={k}, last 3/4 scored)", "seconds": seconds, "peak_gib_over_weights": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (runs on CPU in seconds)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--sequences", type=int, default=None)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--out", default="bench/results/gpu_cache_logits.json")
    args = ap.parse_args()
    import numpy as np
    import torch

    size = dict(TINY if args.tiny else REAL)
    size["sequences"] = args.sequences or size["sequences"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    seqs = np.random.default_rng(0).integers(4, size["vocab"], size=(size["sequences"], size["seq"])).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        params = build_model(Path(tmp), size, device)
        build_s = time.perf_counter() - tick
        rows = [plain_forward(Path(tmp), seqs, size, device), engine_scoring(Path(tmp), seqs, size, device, args.k)]
    tokens = size["sequences"] * size["seq"]
    for r in rows:
        r["tokens_per_s"] = tokens / r["seconds"]
    t = Table(title=f"scoring vs plain forward, {params / 1e9:.2f} B params, vocab {size['vocab']:,}, {size['dtype']}, {size['sequences']} × {size['seq']} tokens, {name}", title_justify="left")
    for col in ("", "seconds", "tokens/s", "peak GiB over weights"):
        t.add_column(col, justify="left" if not col else "right")
    for r in rows:
        peak = r["peak_gib_over_weights"]
        t.add_row(r["variant"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}", "-" if peak is None else f"{peak:.2f}")
    t.caption = f"model build {build_s:.0f} s; batches of {max(1, size['batch_tokens'] // size['seq'])} sequences"
    Console().print(t)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": name, "params": params, "size": size, "k": args.k, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
