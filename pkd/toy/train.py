"""Plain torch SFT and greedy decoding for the toy world's tiny models (teacher-forced agreement
through the engine's scorer).

A hand-written loop rather than a Trainer: measured on the teacher (batch 64, one thread) it took
0.21-0.23 s a step against Trainer's 0.23-0.25, and it needs no dataset or collator classes, no
output dir and no start-up. Batches are right-padded
without an attention mask: causal attention means no real token ever sees a pad on its right, and
pads carry no loss, so the result equals unpadded training at a fraction of the bookkeeping.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """Token ids of one chat, and the index where the loss starts (0: whole text)."""

    ids: list[int]
    loss_start: int


def chat_examples(
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[list[dict[str, str]]],
    *,
    response_only: bool = True,
) -> list[Example]:
    """Tokenize (user, assistant) chats with the chat template. With `response_only` the loss
    covers the assistant turn and its end-of-turn token only, as in SFT on teacher responses."""
    out = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(chat, return_dict=True)["input_ids"]
        assert full[: len(prompt)] == prompt, "chat template must extend the generation prompt"
        out.append(Example(list(full), len(prompt) if response_only else 0))
    return out


def _batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, e.loss_start : len(e.ids)] = ids[i, e.loss_start : len(e.ids)]
    return ids, labels


def train_sft(
    model: PreTrainedModel,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int = 0,
    warmup: int = 20,
    weight_decay: float = 0.01,
) -> float:
    """AdamW with linear warm-up then cosine decay to 10% of `lr`, over shuffled epochs of
    `examples`. Trains `model` in place; returns the final loss (mean of the last 20 steps)."""
    rng = random.Random(seed)
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses = []
    for step in range(steps):
        if len(order) < batch_size:  # a fresh shuffled epoch, appended so batches stay full
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:batch_size], order[batch_size:]
        ids, labels = _batch([examples[i] for i in chosen], pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    return sum(tail) / max(1, len(tail))


@torch.no_grad()
def greedy_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 256,
) -> list[str]:
    """Greedy answers to user questions through the chat template, stopping at end of turn: the
    same decoding a vLLM server does at temperature 0."""
    model.eval()
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for i in range(0, len(questions), batch_size):
            chats = [[{"role": "user", "content": q}] for q in questions[i : i + batch_size]]
            texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return out


def agreement(
    model: PreTrainedModel, examples: Sequence[Example], pad_id: int, batch_size: int = 256
) -> dict[str, float]:
    """Teacher-forced on reference responses: top-1 agreement (how often the model's argmax is
    the reference's next token) and NLL per token, over the loss positions of `examples`, by
    the engine's scorer (pkd.engines.hf.score_model)."""
    from pkd.engines.hf import teacher_forced_metrics

    width = max((len(e.ids) for e in examples), default=1)
    m = teacher_forced_metrics(model, [e.ids for e in examples], [e.loss_start for e in examples], batch_tokens=batch_size * width, pad_id=pad_id)
    return {"agreement": m["top1_agreement"], "nll_per_token": m["nll_per_token"]}
