"""Online samples of the current proxy: one response per prompt of a round's chunk.

vLLM runs in a child process per round (`python -m pkd.align.sample REQUEST.json`), never in the
training process. Why not one long-lived vLLM with a memory fraction: vLLM reserves its share of
the GPU (weights, KV cache, CUDA graphs) for its whole life, and a 70B proxy being trained with
LoRA needs nearly all of the GPU between generations; `del LLM(...)` does not reliably hand that
memory back, but a process exit does. The cost is one engine start per round, small next to a
round's training. The training process holds no model while the child runs (it frees it after
each stage), so the child may use `gpu_memory_utilization` of the whole device. The `hf` engine
runs in-process: it allocates through the same torch allocator that training frees.

A LoRA proxy reaches vLLM either as base + adapter (vLLM's LoRA path) or merged into one plain
model in the round's work folder first (`sample_merged`, see `merges_adapter`); the work folder
is deleted once the round's samples are committed, so at most one merged copy is on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pkd.errors import EngineError


def generate(request: dict[str, Any]) -> dict[str, Any]:
    """Sample one response per prompt (token ids) with the named engine. Returns the texts, the
    number of new tokens, the seconds spent merging (None: not merged), loading the engine and
    generating, and this process's CPU seconds over all three (on a GPU, vLLM's engine core runs
    in a process of its own and is not counted)."""
    import time

    from transformers import AutoTokenizer

    from pkd.engines import load_engine, vllm_on_cpu

    vllm = request["engine"] == "vllm"
    tuning = {"gpu_memory_utilization": request["gpu_memory_utilization"], "seed": request["seed"]} if vllm else {}
    model_dir, adapter_dir, merge_s = request["model_dir"], request["adapter_dir"], None
    started, cpu = time.monotonic(), time.process_time()
    if vllm and adapter_dir and merges_adapter(request["sample_merged"], vllm_on_cpu()):
        from pkd.engines.merge import merged_model

        inputs = {"base": model_dir, "adapter": adapter_dir}  # the folder is the round's own: nothing stale to reuse
        model_dir, adapter_dir = str(merged_model(Path(model_dir), Path(adapter_dir), Path(request["merged_dir"]), inputs)), None
        merge_s = time.monotonic() - started
        started = time.monotonic()
    with load_engine(request["engine"], model_dir, adapter_dir=adapter_dir, **tuning) as engine:
        loaded = time.monotonic()
        outs = engine.generate(
            request["prompt_token_ids"], n=1, temperature=request["temperature"], top_p=request["top_p"],
            max_tokens=request["max_tokens"], seed=request["seed"],
        )  # fmt: skip
        generate_s = time.monotonic() - loaded
    cpu_s = time.process_time() - cpu
    tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
    return {
        "responses": [tokenizer.decode(choices[0], skip_special_tokens=True) for choices in outs],
        "new_tokens": sum(len(choices[0]) for choices in outs), "load_s": loaded - started, "generate_s": generate_s,
        "merged": merge_s is not None, "merge_s": merge_s, "cpu_s": cpu_s,
    }  # fmt: skip


def merges_adapter(setting: str, vllm_on_cpu: bool) -> bool:
    """Whether vLLM samples the round from base + adapter merged into one model (`sample_merged`:
    auto, always or never) rather than through its LoRA path.

    auto merges where vLLM runs on the CPU and keeps the adapter on a GPU. On the CPU vLLM's LoRA
    path is the slow part and a small proxy merges in seconds: `python bench/proxy_align.py`
    (SmolLM2-135M + LoRA r16, 16 prompts × ≤ 32 tokens, 2 cores, one run) sampled 121 tokens/s
    merged against 32 with the adapter, and the round's generation wall, child process, merge
    (4.4 s) and engine start included, was 24.5 s against 30.2. On a GPU auto keeps the adapter,
    by reasoning rather than measurement (no GPU run yet): `merged_model` merges in float32 on the
    host, so a 70B proxy needs ~280 GB of RAM and writes ~140 GB every round, minutes before
    vLLM starts, while vLLM's GPU LoRA kernels are made for serving adapters at batch scale and a
    round's sampling is short next to its training. `always` merges anyway (e.g. a small proxy on
    a GPU, after measuring it with the bench)."""
    return setting == "always" or (setting == "auto" and vllm_on_cpu)


def sample_round(request: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """`generate` in-process (hf) or in a child process that exits before training starts (vllm)."""
    if request["engine"] != "vllm":
        return generate(request)
    workdir.mkdir(parents=True, exist_ok=True)
    req, out, log = workdir / "request.json", workdir / "responses.json", workdir / "vllm.log"
    req.write_text(json.dumps(request | {"merged_dir": str(workdir / "merged")}))
    with open(log, "wb") as fh:
        proc = subprocess.run([sys.executable, "-m", "pkd.align.sample", str(req), str(out)], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise EngineError(f"proxy sampling with vLLM failed (exit {proc.returncode}); rerun to retry, or pass --engine hf. Log tail ({log}):\n{tail}")
    return json.loads(out.read_text())


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when its parent dies (even by `kill -9`), so that an
    interrupted run never leaves a vLLM holding the GPU."""
    import ctypes
    import signal

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


if __name__ == "__main__":  # the vLLM child: request path, output path
    _die_with_parent()
    result = generate(json.loads(Path(sys.argv[1]).read_text()))
    tmp = Path(sys.argv[2] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(sys.argv[2])
