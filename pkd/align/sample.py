"""Online samples of the current proxy: one response per prompt of a round's chunk.

vLLM runs in a child process per round (`python -m pkd.align.sample REQUEST.json`), never in the
training process. Why not one long-lived vLLM with a memory fraction: vLLM reserves its share of
the GPU (weights, KV cache, CUDA graphs) for its whole life, and a 70B proxy being trained with
LoRA needs nearly all of the GPU between generations; `del LLM(...)` does not reliably hand that
memory back, but a process exit does. The cost is one engine start per round, small next to a
round's training. The training process holds no model while the child runs (it frees it after
each stage), so the child may use `gpu_memory_utilization` of the whole device. The `hf` engine
runs in-process: it allocates through the same torch allocator that training frees.
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
    number of new tokens, and the seconds spent loading the engine and generating."""
    import time

    from transformers import AutoTokenizer

    from pkd.engines import load_engine

    tuning = {"gpu_memory_utilization": request["gpu_memory_utilization"], "seed": request["seed"]} if request["engine"] == "vllm" else {}
    started = time.monotonic()
    with load_engine(request["engine"], request["model_dir"], adapter_dir=request["adapter_dir"], **tuning) as engine:
        loaded = time.monotonic()
        outs = engine.generate(
            request["prompt_token_ids"], n=1, temperature=request["temperature"], top_p=request["top_p"],
            max_tokens=request["max_tokens"], seed=request["seed"],
        )  # fmt: skip
        generate_s = time.monotonic() - loaded
    tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
    return {
        "responses": [tokenizer.decode(choices[0], skip_special_tokens=True) for choices in outs],
        "new_tokens": sum(len(choices[0]) for choices in outs), "load_s": loaded - started, "generate_s": generate_s,
    }  # fmt: skip


def sample_round(request: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """`generate` in-process (hf) or in a child process that exits before training starts (vllm)."""
    if request["engine"] != "vllm":
        return generate(request)
    workdir.mkdir(parents=True, exist_ok=True)
    req, out, log = workdir / "request.json", workdir / "responses.json", workdir / "vllm.log"
    req.write_text(json.dumps(request))
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
