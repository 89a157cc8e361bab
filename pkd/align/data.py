"""Teacher samples as proxy-alignment data: read D_w / D_p (and a held-out slice), cut D_p into
per-round chunks, and build SFT rows and DPO pairs (TRL tokenizes them).

Orders are fixed by hashes of ids and the seed, never by file order, so a resumed run picks the
same chunk for round k as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pkd.errors import InputError
from pkd.teacher.samples import TeacherSample

def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


@dataclass(frozen=True)
class AlignData:
    """What each stage trains or evaluates on."""

    warmup: list[TeacherSample]
    align_prompts: list[list[TeacherSample]]  # D_p grouped by prompt, in seeded order
    heldout: list[TeacherSample]
    heldout_from: str  # the split the held-out slice was taken from

    def chunk(self, round_index: int, rounds: int, chunk_size: int | None) -> list[list[TeacherSample]]:
        """Prompts of round `round_index` (0-based): consecutive chunks of D_p, wrapping around
        when rounds × chunk_size exceeds it."""
        n = len(self.align_prompts)
        size = chunk_size or -(-n // max(rounds, 1))
        return [self.align_prompts[(round_index * size + i) % n] for i in range(min(size, n))]


def split_samples(samples: list[TeacherSample], *, eval_samples: int, seed: int, where: str) -> AlignData:
    """D_w, D_p by prompt, and a held-out slice: from D_s (never trained on by the proxy, and what
    cache-logits will score), or carved out of D_p when the folder has no D_s rows."""
    by_split: dict[str, list[TeacherSample]] = defaultdict(list)
    for s in samples:
        by_split[s.split].append(s)
    missing = [name for name in ("warmup", "align") if not by_split[name]]
    if missing:
        have = ", ".join(f"{k} {len(v)}" for k, v in sorted(by_split.items()) if v) or "no rows at all"
        raise InputError(
            f"{where}: no teacher samples in split(s) {' and '.join(missing)} ({have}); proxy alignment needs warm-up (D_w) and "
            "alignment (D_p) rows: resample with [teacher_sample] split_ratios giving them a share, e.g. [0.1, 0.45, 0.45]"
        )
    prompts: dict[str, list[TeacherSample]] = defaultdict(list)
    for s in by_split["align"]:
        prompts[s.prompt_id].append(s)
    ordered = [prompts[p] for p in sorted(prompts, key=lambda p: _rank(p, seed))]
    heldout_from = "distill"
    pool = sorted(by_split["distill"], key=lambda s: _rank(s.sample_id, seed))
    if not pool:  # hold out whole prompts so that no held-out prompt is trained on
        heldout_from = "align"
        take = 0
        while take < len(ordered) - 1 and sum(map(len, ordered[:take])) < eval_samples:
            take += 1
        pool, ordered = [s for group in ordered[:take] for s in group], ordered[take:]
    warmup = sorted(by_split["warmup"], key=lambda s: _rank(s.sample_id, seed))
    return AlignData(warmup=warmup, align_prompts=ordered, heldout=pool[:eval_samples], heldout_from=heldout_from)


def sft_rows(samples: list[TeacherSample]) -> list[dict[str, Any]]:
    """Conversational prompt/completion rows: TRL's SFTTrainer then puts the loss on the
    completion (the teacher's assistant turn) only."""
    return [{"prompt": s.messages, "completion": [{"role": "assistant", "content": s.response}]} for s in samples]


def preference_pairs(chunk: list[list[TeacherSample]], proxy: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """DPO rows (chosen = a teacher response, rejected = the proxy's response to the same prompt),
    one per teacher sample; pairs whose two texts are equal carry no preference and are dropped.
    Returns (rows, dropped)."""
    rows, dropped = [], 0
    for group in chunk:
        rejected = proxy[group[0].prompt_id]
        for s in group:
            if s.response.strip() == rejected.strip():
                dropped += 1
                continue
            rows.append({
                "prompt": s.messages,
                "chosen": [{"role": "assistant", "content": s.response}],
                "rejected": [{"role": "assistant", "content": rejected}],
            })  # fmt: skip
    return rows, dropped
