"""Deterministic data splits: D_w (warm-up), D_p (proxy alignment), D_s (student distillation).

A prompt's split depends only on its id and the ratios, never on file order, batch or machine, so
every step (and every `--part i/N` worker) agrees on it without coordination, and all samples of
one prompt land in the same split (no prompt leaks between alignment and distillation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLITS = ("warmup", "align", "distill")
DEFAULT_RATIOS = (0.10, 0.45, 0.45)
_SALT = b"pkd-split-v1\0"  # changing it reshuffles every split: bump only with a format change


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative fractions summing to 1 (to 1e-6), one per split in `SPLITS` order."""
    if len(ratios) != len(SPLITS):
        raise ValueError(f"need {len(SPLITS)} ratios ({'/'.join(SPLITS)}), got {len(ratios)}")
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be >= 0 and sum to 1, got {list(ratios)}")
    return tuple(float(r) for r in ratios)  # type: ignore[return-value]


def unit_hash(prompt_id: str) -> float:
    """A uniform number in [0, 1) fixed by the id (first 64 bits of a salted sha256)."""
    digest = hashlib.sha256(_SALT + prompt_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(prompt_id: str, ratios: Sequence[float] = DEFAULT_RATIOS) -> str:
    """The split ("warmup", "align" or "distill") that `prompt_id` belongs to."""
    u, edge = unit_hash(prompt_id), 0.0
    for name, ratio in zip(SPLITS, ratios):
        edge += ratio
        if u < edge:
            return name
    return next(name for name, r in zip(reversed(SPLITS), reversed(tuple(ratios))) if r > 0)  # float rounding at 1.0
