"""Draws from a model's full next-token distribution for sampled (RS-KD) logit caches.

Seeded per sequence (the caller derives the seed from the sample id), so a sample gets the same
draws however the samples are batched, resumed or split into `--part`s — up to float noise in
the logits, which can move a draw only when its uniform falls within ~1e-6 of a bucket edge.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def sample_seed(run_seed: int, sample_id: str) -> int:
    """A 63-bit seed for one sample's draws, fixed by the run seed and the sample id alone."""
    digest = hashlib.sha256(f"pkd-draws-v1\0{run_seed}\0{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_unique(
    logprobs: torch.Tensor,  # (T, V) float32 log-softmax of the logits
    n: int,
    temperature: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n draws per row from softmax(logprobs / temperature) -> the distinct ids (T, n) int32,
    their draw counts (T, n) uint8 and log p (T, n) float32 under the untempered model; each
    row's distinct ids come first (ascending), then padding (id 0, count 0, logprob 0)."""
    gen = torch.Generator(device=logprobs.device).manual_seed(seed)
    probs = torch.softmax(logprobs / temperature, dim=-1) if temperature != 1.0 else logprobs.exp()
    draws = torch.multinomial(probs, n, replacement=True, generator=gen).sort(dim=-1).values  # (T, n)
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.long().cumsum(-1) - 1  # (T, n) index of each draw's distinct id
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))  # (T, n)
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)  # duplicates write the same id
    valid = counts > 0
    lp = torch.where(valid, logprobs.gather(1, ids), 0.0)
    return ids.to(torch.int32).cpu().numpy(), counts.to(torch.uint8).cpu().numpy(), lp.cpu().numpy()
