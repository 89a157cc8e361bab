"""How close the proxy is to the teacher, measured on teacher-forced token sequences:

- NLL per token of teacher responses (lower = the proxy finds the teacher's text likelier), and
  top-1 agreement (how often the proxy's argmax is the teacher's next token), on held-out samples;
- DPO implicit rewards on a round's pairs: r = β·(log π(y|x) − log π_ref(y|x)), their margin
  chosen − rejected and accuracy P(margin > 0), with π_ref the previous round's proxy.

Scored with the model in memory (so the training process measures its own model without loading
another copy) by the one teacher-forced scorer, `pkd.engines.hf.score_model`, whose batches hold
at most `batch_tokens` padded tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pkd.engines.hf import score_model, teacher_forced_metrics


def response_metrics(model: Any, seqs: Sequence[tuple[list[int], int]], batch_tokens: int = 8192) -> dict[str, float]:
    """Token-weighted NLL and top-1 agreement over the response tokens of `seqs` (ids, start)."""
    return teacher_forced_metrics(model, [ids for ids, _ in seqs], [start for _, start in seqs], batch_tokens=batch_tokens)


def sequence_logps(model: Any, seqs: Sequence[tuple[list[int], int]], batch_tokens: int = 8192) -> list[float]:
    """log π(response | prompt) per sequence: the sum TRL's DPO loss uses."""
    starts = [min(max(start, 1), len(ids)) for ids, start in seqs]
    return [float(r.token_logprobs.sum()) for r in score_model(model, [ids for ids, _ in seqs], starts, 1, batch_tokens=batch_tokens)]


def pair_rewards(model: Any, pairs: Sequence[dict[str, Any]], beta: float, max_length: int | None, batch_tokens: int = 8192) -> dict[str, float]:
    """Mean implicit rewards, margin and accuracy of the policy on tokenized DPO rows (TRL's
    `prompt_ids`/`chosen_ids`/`rejected_ids` + precomputed `ref_*_logps`), truncated like TRL's
    collator (keep the start)."""
    if not pairs:
        return {"pairs": 0}

    def seqs(key: str) -> list[tuple[list[int], int]]:
        return [((p["prompt_ids"] + p[key])[:max_length], len(p["prompt_ids"])) for p in pairs]

    chosen = torch.tensor(sequence_logps(model, seqs("chosen_ids"), batch_tokens)) - torch.tensor([p["ref_chosen_logps"] for p in pairs])
    rejected = torch.tensor(sequence_logps(model, seqs("rejected_ids"), batch_tokens)) - torch.tensor([p["ref_rejected_logps"] for p in pairs])
    margin = beta * (chosen - rejected)  # (P,)
    return {
        "pairs": len(pairs),
        "reward_chosen": float(beta * chosen.mean()),
        "reward_rejected": float(beta * rejected.mean()),
        "reward_margin": float(margin.mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
    }
