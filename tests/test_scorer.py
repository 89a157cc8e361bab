"""One teacher-forced scorer (pkd.engines.hf.score_model) behind every NLL / top-1 agreement pkd
reports: checked against a plain one-sequence-at-a-time forward, and no other module scoring
on its own."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pkd.align.metrics import response_metrics, sequence_logps
from pkd.engines.hf import HFEngine, score_model, teacher_forced_metrics
from pkd.toy.train import Example, agreement

PKG = Path(__file__).resolve().parent.parent / "pkd"


def test_no_module_scores_on_its_own():
    """log_softmax appears where the one scorer lives and in the student's losses, nowhere else."""
    users = sorted(p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if re.search(r"log_softmax\(|\.argmax\(", p.read_text()))
    assert users == ["engines/hf.py", "student/losses.py", "student/sampled_loss.py"]


@pytest.fixture(scope="module")
def sequences() -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 200, size=n).tolist() for n in (5, 17, 9, 30, 2, 12)]
    return seqs, [1, 6, 8, 29, 2, 4]  # the fifth has no positions to score (start == len)


def _reference(model, seqs, starts):
    """Unbatched, unpadded full forwards: the definition the scorer must reproduce."""
    nll, hits, tokens, sums = 0.0, 0, 0, []
    with torch.no_grad():
        for s, start in zip(seqs, starts):
            logp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), -1)  # (T, V)
            target = torch.tensor(s[start:])
            lp = logp[start - 1 : len(s) - 1].gather(1, target[:, None])[:, 0]
            sums.append(float(lp.sum()))
            nll -= float(lp.sum())
            hits += int((logp[start - 1 : len(s) - 1].argmax(-1) == target).sum())
            tokens += len(target)
    return {"nll_per_token": nll / tokens, "top1_agreement": hits / tokens, "tokens": tokens}, sums


def test_every_caller_gets_the_reference_numbers(tiny_family, sequences):
    seqs, starts = sequences
    model = AutoModelForCausalLM.from_pretrained(tiny_family.proxy, dtype=torch.float32)
    want, sums = _reference(model, seqs, starts)
    model.train()
    for batch_tokens in (8, 64, 10_000):  # one sequence per forward, a few, all at once
        got = teacher_forced_metrics(model, seqs, starts, batch_tokens=batch_tokens)
        assert got["tokens"] == want["tokens"] and got["top1_agreement"] == pytest.approx(want["top1_agreement"])
        assert got["nll_per_token"] == pytest.approx(want["nll_per_token"], rel=1e-5)
    assert model.training  # eval mode only during the call
    held = response_metrics(model, list(zip(seqs, starts)), batch_tokens=32)
    assert held["nll_per_token"] == pytest.approx(want["nll_per_token"], rel=1e-5)
    np.testing.assert_allclose(sequence_logps(model, list(zip(seqs, starts))), sums, rtol=1e-5)
    toy = agreement(model, [Example(s, start) for s, start in zip(seqs, starts)], pad_id=0, batch_size=2)
    assert toy == pytest.approx({"agreement": want["top1_agreement"], "nll_per_token": want["nll_per_token"]}, rel=1e-5)
    with HFEngine(tiny_family.proxy, dtype="float32", batch_tokens=16) as engine:
        results = list(engine.score_topk(seqs, starts, 4))
    direct = list(score_model(model, seqs, starts, 4, batch_tokens=16))
    assert len(results[4].token_logprobs) == 0
    for a, b, s in zip(results, direct, sums):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        assert float(a.token_logprobs.sum()) == pytest.approx(s, rel=1e-5, abs=1e-6)
