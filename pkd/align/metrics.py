"""How close the proxy is to the teacher, measured on teacher-forced token sequences:

- NLL per token of teacher responses (lower = the proxy finds the teacher's text likelier), and
  top-1 agreement (how often the proxy's argmax is the teacher's next token), on held-out samples;
- DPO implicit rewards on a round's pairs: r = β·(log π(y|x) − log π_ref(y|x)), their margin
  chosen − rejected and accuracy P(margin > 0), with π_ref the previous round's proxy.

Plain no-grad forwards of the model in memory, so the training process measures its own model
without loading another copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


def _batches(n: int, size: int) -> Iterator[range]:
    for i in range(0, n, size):
        yield range(i, min(i + size, n))


@torch.no_grad()
def _response_tokens(model: Any, seqs: Sequence[tuple[list[int], int]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence (ids, start): (logprob of each response token, whether it was the argmax)."""
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(len(seqs), batch_size):
            batch = [seqs[i] for i in idx]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            device = next(model.parameters()).device
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
            for row, (ids, start) in enumerate(batch):
                pos = torch.arange(max(start, 1) - 1, len(ids) - 1, device=device)  # position t predicts t + 1
                target = input_ids[row, pos + 1].to(device)
                logp = torch.log_softmax(logits[row, pos], dim=-1)  # (T_resp, V)
                yield logp.gather(1, target[:, None])[:, 0].cpu(), (logp.argmax(-1) == target).cpu()
    finally:
        model.train(was_training)


def response_metrics(model: Any, seqs: Sequence[tuple[list[int], int]], batch_size: int = 4) -> dict[str, float]:
    """Token-weighted NLL and top-1 agreement over the response tokens of `seqs`."""
    nll, hits, tokens = 0.0, 0, 0
    for logp, top1 in _response_tokens(model, seqs, batch_size):
        nll -= float(logp.sum())
        hits += int(top1.sum())
        tokens += logp.numel()
    return {"nll_per_token": nll / max(tokens, 1), "top1_agreement": hits / max(tokens, 1), "tokens": tokens, "samples": len(seqs)}


def sequence_logps(model: Any, seqs: Sequence[tuple[list[int], int]], batch_size: int = 4) -> list[float]:
    """log π(response | prompt) per sequence: the sum TRL's DPO loss uses."""
    return [float(logp.sum()) for logp, _ in _response_tokens(model, seqs, batch_size)]


def pair_rewards(model: Any, pairs: Sequence[dict[str, Any]], beta: float, max_length: int | None, batch_size: int = 4) -> dict[str, float]:
    """Mean implicit rewards, margin and accuracy of the policy on tokenized DPO rows (TRL's
    `prompt_ids`/`chosen_ids`/`rejected_ids` + precomputed `ref_*_logps`), truncated like TRL's
    collator (keep the start)."""
    if not pairs:
        return {"pairs": 0}

    def seqs(key: str) -> list[tuple[list[int], int]]:
        return [((p["prompt_ids"] + p[key])[:max_length], len(p["prompt_ids"])) for p in pairs]

    chosen = torch.tensor(sequence_logps(model, seqs("chosen_ids"), batch_size)) - torch.tensor([p["ref_chosen_logps"] for p in pairs])
    rejected = torch.tensor(sequence_logps(model, seqs("rejected_ids"), batch_size)) - torch.tensor([p["ref_rejected_logps"] for p in pairs])
    margin = beta * (chosen - rejected)  # (P,)
    return {
        "pairs": len(pairs),
        "reward_chosen": float(beta * chosen.mean()),
        "reward_rejected": float(beta * rejected.mean()),
        "reward_margin": float(margin.mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
    }
