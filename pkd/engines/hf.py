"""The transformers engine: plain PyTorch forward passes, for machines without vLLM and as the
reference vLLM is tested against. Memory is bounded by `batch_tokens` (padded tokens per
forward): a batch's logits take at most batch_tokens × vocab values in the model's dtype, plus
one sequence's in float32 at a time.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pkd.engines import ScoreResult, check_score_args, empty_result, windows
from pkd.errors import EngineError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

WINDOW_BATCHES = 16  # score_topk sorts by length within windows of this many batches' tokens


class HFEngine:
    """A transformers causal LM (plus an optional PEFT LoRA), in eval mode, on one device."""

    kind = "hf"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        adapter_dir: str | os.PathLike | None = None,
        dtype: str = "auto",
        max_logprobs: int = 20,
        device: str | None = None,
        batch_tokens: int = 8192,
    ) -> None:
        """`dtype` "auto" keeps the checkpoint's; `device` defaults to cuda when available.
        max_logprobs is no limit of transformers: it is enforced so that both engines accept the
        same requests."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_logprobs = max_logprobs
        self.batch_tokens = batch_tokens
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
        self._model = model.to(self.device).eval()
        self.vocab_size = model.config.get_text_config().vocab_size
        # Like vLLM: the tokenizer's eos and the generation config's all end a completion.
        self._eos = sorted(set(_ids(model.generation_config.eos_token_id)) | set(_ids(tokenizer.eos_token_id)))
        pad = tokenizer.pad_token_id
        self._pad = pad if pad is not None else (self._eos[0] if self._eos else 0)
        if adapter_dir is not None:
            self.set_adapter(adapter_dir)

    def set_adapter(self, adapter_dir: str | os.PathLike | None) -> None:
        from peft import PeftModel

        if isinstance(self._model, PeftModel):
            self._model = self._model.base_model.unload()  # drops the LoRA layers, base untouched
        if adapter_dir is not None:
            peft_model = PeftModel.from_pretrained(self._model, str(adapter_dir))
            self._model = peft_model.to(self.device).eval()

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
        """Left-padded batches of prompts, n samples each, within batch_tokens. A seed makes a
        call reproducible (the global RNG is left untouched); the samples differ from vLLM's for
        the same seed."""
        import torch
        from transformers import GenerationConfig

        stops = set(self._eos) | set(stop_token_ids)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else {}
        draws = n if sampling else 1  # greedy: one completion, repeated n times
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            num_return_sequences=draws,
            eos_token_id=sorted(stops),
            pad_token_id=self._pad,
            **sampling,
        )
        budget = max(1, self.batch_tokens // draws)  # prompt + completion tokens per sample
        lengths = [len(p) + max_tokens for p in prompts]
        results: list[list[list[int]]] = []
        devices = []  # fork_rng keeps the CPU generator and these CUDA ones
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            for batch in _batches(range(len(prompts)), lengths, budget, sort=False):
                width = max(len(prompts[i]) for i in batch)
                ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # left padding: the prompts end where generation starts
                    ids[row, width - len(prompts[i]) :] = torch.as_tensor(prompts[i])
                    mask[row, width - len(prompts[i]) :] = 1
                out = self._live().generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=config
                )  # (B * draws, width + new), sample j of prompt b in row b * draws + j
                new = [_cut(c, stops) for c in out[:, width:].tolist()]
                for row in range(len(batch)):
                    samples = new[row * draws : (row + 1) * draws]
                    results.append([list(c) for c in samples * (n // draws)])
        return results

    def score_topk(
        self,
        sequences: Sequence[Sequence[int]],
        starts: Sequence[int],
        k: int,
        *,
        batch_tokens: int | None = None,
    ) -> Iterator[ScoreResult]:
        """Teacher-forced forward over right-padded, length-sorted batches of at most
        `batch_tokens` padded tokens; log_softmax in float32 over the full vocabulary."""
        check_score_args(sequences, starts, k, self.max_logprobs, self.vocab_size)
        yield from score_model(self._live(), sequences, starts, k, batch_tokens=batch_tokens or self.batch_tokens, pad_id=self._pad)

    def score_sampled(
        self,
        sequences: Sequence[Sequence[int]],
        starts: Sequence[int],
        n: int,
        *,
        seeds: Sequence[int],
        temperature: float = 1.0,
    ) -> Iterator[ScoreResult]:
        """Teacher-forced like score_topk, but per position n draws from the full distribution
        (softmax of the logits / `temperature`), seeded per sequence: ScoreResult rows hold the
        distinct ids, their counts and their untempered logprobs (pkd.engines.draws)."""
        check_score_args(sequences, starts, 1, self.max_logprobs, self.vocab_size)
        draws = [(n, temperature, seed) for seed in seeds]
        yield from score_model(self._live(), sequences, starts, n, batch_tokens=self.batch_tokens, pad_id=self._pad, draws=draws)

    def _live(self) -> PreTrainedModel | PeftModel:
        if self._model is None:
            raise EngineError("this transformers engine was closed; load a new one")
        return self._model

    def close(self) -> None:
        """Drop the model and return cached GPU memory."""
        if self._model is None:
            return
        import torch

        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> HFEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# the one teacher-forced scorer ----------------------------------------------------------------------
# Every NLL / top-1 agreement pkd reports (cache-logits with this engine, proxy-align's held-out
# metrics and DPO rewards, eval, the toy world) comes from `score_model`, so they agree and all
# bound memory the same way.


def score_model(
    model: PreTrainedModel | PeftModel,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    k: int,
    *,
    batch_tokens: int = 8192,
    pad_id: int = 0,
    draws: Sequence[tuple[int, float, int]] | None = None,
) -> Iterator[ScoreResult]:
    """Per sequence, in input order, the top-k ids/logprobs and the actual token's logprob at
    positions [start, len) of a model already in memory (eval mode during the call, restored
    after). With `draws` ((n = k, temperature, seed) per sequence), the rows are n seeded draws
    from the full distribution instead of the top-k (a sampled cache). Batches hold at most
    `batch_tokens` padded tokens; sequences with start == len get an empty result. Callers check
    the arguments (`check_score_args`)."""
    was_training = model.training
    model.eval()
    try:
        vocab = model.config.get_text_config().vocab_size
        lengths = [len(s) for s in sequences]
        for group in windows(lengths, batch_tokens * WINDOW_BATCHES):
            done: dict[int, ScoreResult] = {}
            todo = [i for i in group if starts[i] < lengths[i]]
            for batch in _batches(todo, lengths, batch_tokens, sort=True):
                drawn = None if draws is None else [draws[i] for i in batch]
                scored = _score_batch(model, [sequences[i] for i in batch], [starts[i] for i in batch], k, pad_id, vocab, drawn)
                done.update(zip(batch, scored))
            for i in group:
                yield done.get(i) or empty_result(k, sampled=draws is not None)
    finally:
        model.train(was_training)


def teacher_forced_metrics(
    model: PreTrainedModel | PeftModel, sequences: Sequence[Sequence[int]], starts: Sequence[int], *, batch_tokens: int = 8192, pad_id: int = 0
) -> dict[str, float]:
    """Token-weighted NLL per token and top-1 agreement (the model's argmax is the actual next
    token) over positions [start, len) of each sequence; starts are clamped into [1, len]."""
    starts = [min(max(s, 1), len(q)) for q, s in zip(sequences, starts, strict=True)]
    nll, hits, tokens = 0.0, 0, 0
    for seq, start, r in zip(sequences, starts, score_model(model, sequences, starts, 1, batch_tokens=batch_tokens, pad_id=pad_id)):
        nll -= float(r.token_logprobs.sum())
        hits += int((r.topk_ids[:, 0] == np.asarray(seq[start:])).sum())
        tokens += len(r.token_logprobs)
    return {"nll_per_token": nll / max(tokens, 1), "top1_agreement": hits / max(tokens, 1), "tokens": tokens, "samples": len(sequences)}


def greedy_answers(model: PreTrainedModel | PeftModel, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, batch_size: int = 64) -> list[str]:
    """Greedy answers to tokenised prompts (left-padded batches), decoded without special tokens:
    what exact match (`pkd eval`, proxy-align's skill) compares with a reference."""
    import torch

    pad = tokenizer.pad_token_id or 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch])  # (B, width)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def _score_batch(
    model: PreTrainedModel | PeftModel, seqs: list[Sequence[int]], starts: list[int], k: int, pad_id: int, vocab: int, draws: list[tuple[int, float, int]] | None = None
) -> list[ScoreResult]:
    """Top-k of each position, or with `draws` ((n, temperature, seed) per sequence) draws."""
    import torch

    from pkd.engines.draws import draw_unique

    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):  # right padding: causal attention keeps it out of the real rows
        ids[row, : len(s)] = torch.as_tensor(s)
        mask[row, : len(s)] = 1
    # Position t is predicted by the logits at t - 1: keep only rows [min start - 1, width - 1).
    lo = min(starts) - 1
    keep = torch.arange(lo, width - 1, device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits  # (B, width - 1 - lo, V)
        results = []
        for row, (s, start) in enumerate(zip(seqs, starts)):
            # (T, V); like vLLM, over the config's vocabulary should lm_head be padded wider
            rows = logits[row, start - 1 - lo : len(s) - 1 - lo, :vocab]
            logprobs = rows.float().log_softmax(-1)  # one sequence at a time: bounded float32 copy
            target = torch.as_tensor(s[start:], device=device)  # (T,)
            token_lp = logprobs.gather(-1, target[:, None])[:, 0]  # (T,)
            if draws is not None and torch.isnan(logprobs).any():
                # nothing to draw from: the NaN token logprobs make the writer refuse the sample,
                # naming it and the position, as in top-k mode (pkd.cache.shards.check_finite)
                nothing = np.zeros((len(token_lp), draws[row][0]), np.int32)
                results.append(ScoreResult(nothing, nothing.astype(np.float32), token_lp.cpu().numpy(), nothing.astype(np.uint8)))
                continue
            if draws is not None:
                ids_, counts, lps = draw_unique(logprobs, *draws[row])  # (T, n) each
                results.append(ScoreResult(ids_, lps, token_lp.cpu().numpy(), counts))
                continue
            top_lp, top_ids = logprobs.topk(k, dim=-1)  # (T, k), descending
            results.append(
                ScoreResult(
                    topk_ids=top_ids.to(torch.int32).cpu().numpy(),
                    topk_logprobs=top_lp.cpu().numpy(),
                    token_logprobs=token_lp.cpu().numpy(),
                )
            )
    return results


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _cut(tokens: list[int], stops: set[int]) -> list[int]:
    """A completion up to and including its first stop token; after it come only pad ids."""
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[: j + 1]
    return tokens


def _batches(indices: Sequence[int], lengths: Sequence[int], budget: int, *, sort: bool) -> Iterator[list[int]]:
    """Groups of indices whose padded size (count × longest) stays within budget (one index at
    least). Sorting by length first (score_topk) keeps padding small; generate keeps the input
    order so that a seeded call is reproducible batch by batch."""
    order = sorted(indices, key=lambda i: -lengths[i]) if sort else list(indices)
    batch: list[int] = []
    longest = 0
    for i in order:
        if batch and (len(batch) + 1) * max(longest, lengths[i]) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        yield batch
