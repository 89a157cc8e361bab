"""Where the demo's models are right and wrong. From the logit caches alone (no model loaded):
how well ℓ separates wrong teacher responses from right ones, and where the proxy's top-1 agrees
with the teacher's tokens. From a student: its answers on the held-out prompts the teacher got
right and those it got wrong.

Position classes of a response token (a number may take two tokens, " 3" "1"):
- `all`: every response position;
- `computed`: the tokens of the number right after "=", where the arithmetic happens; split into
  `computed_teacher_right` and `computed_teacher_slipped` by checking the teacher's equation;
- `answer`: the tokens of the number after "Answer:".
At a slipped token, `proxy_says_true` is the share where the proxy's top-1 is the true result's
token: what KD then pulls the student towards, against the teacher's token.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pkd.store import Folder
from pkd.toy.stats import auc
from pkd.toy.tasks import is_correct

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EQUATION_RE = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)")
ANSWER_RE = re.compile(r"Answer: (\d+)")


def _open(cache: Path):  # -> (Folder, LogitCacheManifest)
    from pkd.records import LogitCacheManifest

    folder = Folder(str(cache))
    return folder, folder.read_manifest(LogitCacheManifest)


def sample_order(cache: Path) -> list[str]:
    """The cache's sample ids in file order (the order its rows are streamed from)."""
    from pkd.cache.shards import iter_column

    folder, manifest = _open(cache)
    return [str(i) for chunk in iter_column(folder, manifest, "sample_id") for i in chunk]


def _teacher_correct(teacher: Path) -> dict[str, bool]:
    """sample_id → whether the teacher's response states the prompt's (correct) reference."""
    from pkd.teacher.samples import read_teacher_samples

    _, samples = read_teacher_samples(Folder(str(teacher)))
    return {s.sample_id: is_correct(s, s.response) for s in samples if s.reference is not None}


def weight_separation(teacher: Path, cache: Path) -> dict[str, Any]:
    """AUC of ℓ for telling right teacher responses (positive) from wrong ones, and the mean
    sample weight w = σ((ℓ − μ)/γ) each group gets, over the cache's samples; also the AUC of the
    response's lowest token logprob."""
    from pkd.cache.shards import iter_column

    folder, manifest = _open(cache)
    right = _teacher_correct(teacher)
    ids = np.concatenate(list(iter_column(folder, manifest, "sample_id")))
    ell = np.concatenate(list(iter_column(folder, manifest, "seq_logprob"))).astype(np.float64)
    stats = manifest.seq_logprob
    # The trainer's w = σ((ℓ − μ)/γ) (pkd.student.losses.sample_weights; toy may not import the
    # student stage, and the formula is one line).
    w = 1 / (1 + np.exp(-(ell - stats.mu) / stats.gamma)) if stats.gamma > 0 else np.full_like(ell, 0.5)
    ok = np.array([right[str(i)] for i in ids])
    # Alternatives to the mean ℓ, for comparison: one slipped digit among ~20 tokens barely moves
    # a mean, but it is the response's least likely token.
    from pkd.cache.shards import iter_samples

    worst = {s.sample_id: float(s.token_logprob.min()) for s in iter_samples(folder, manifest)}
    low = np.array([worst[str(i)] for i in ids])
    return {
        "samples": int(len(ok)),
        "teacher_wrong_share": float(1 - ok.mean()),
        "auc_ell_right_vs_wrong": auc(ell[ok].tolist(), ell[~ok].tolist()),
        "auc_min_token_logprob": auc(low[ok].tolist(), low[~ok].tolist()),
        "mean_weight_right": float(w[ok].mean()) if ok.any() else None,
        "mean_weight_wrong": float(w[~ok].mean()) if (~ok).any() else None,
        "mean_weight": float(w.mean()),
    }


def _classes(pieces: list[str], encode: Callable[[str], list[str]]) -> list[tuple[str, str | None]]:
    """(class, the piece the true result has at this position, or None) for each response token,
    from the tokens' decoded `pieces`. A number may span tokens (" 3", "1"): a token of a
    computed result counts as `computed_teacher_slipped` when its piece differs from the piece
    at the same index of the true result (`encode(" 31")`), else `computed_teacher_right`."""
    text = "".join(pieces)
    bounds = np.cumsum([0] + [len(p) for p in pieces])  # token i covers text[bounds[i]:bounds[i+1]]
    out: list[tuple[str, str | None]] = [("other", None)] * len(pieces)

    def tokens_in(span: tuple[int, int]) -> list[int]:
        return [i for i in range(len(pieces)) if bounds[i] < span[1] and bounds[i + 1] > span[0]]

    for m in EQUATION_RE.finditer(text):
        a, op, b = int(m[1]), m[2], int(m[3])
        true = encode(" " + str(a + b if op == "+" else a - b))
        for j, i in enumerate(tokens_in(m.span(4))):
            t = true[j] if j < len(true) else None
            out[i] = ("computed_teacher_right", None) if t == pieces[i] else ("computed_teacher_slipped", t)
    for m in ANSWER_RE.finditer(text):
        for i in tokens_in(m.span(1)):
            out[i] = ("answer", None)
    return out


def agreement_by_position(cache: Path, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Top-1 agreement of the cached proxy with the teacher's tokens, per position class."""
    from pkd.cache.shards import iter_samples

    folder, manifest = _open(cache)
    hits, counts = Counter(), Counter()

    def encode(text: str) -> list[str]:
        return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    true_hits = 0
    for s in iter_samples(folder, manifest):
        response = s.input_ids[s.response_start :]  # (T,)
        top1 = s.topk_ids[:, 0]  # (T,)
        pieces = [tokenizer.decode([int(i)]) for i in response]
        for t, (cls, true) in enumerate(_classes(pieces, encode)):
            agree = int(top1[t] == response[t])
            groups = ["all", cls] + (["computed"] if cls.startswith("computed") else [])
            for g in groups:
                hits[g] += agree
                counts[g] += 1
            if cls == "computed_teacher_slipped":
                true_hits += tokenizer.decode([int(top1[t])]) == true
    out = {g: {"agreement": hits[g] / counts[g], "tokens": counts[g]} for g in counts if g != "other"}
    if counts["computed_teacher_slipped"]:
        out["computed_teacher_slipped"]["proxy_says_true"] = true_hits / counts["computed_teacher_slipped"]
    return out


def answers_by_teacher_correctness(model: Path, heldout: Path) -> dict[str, Any]:
    """A student's greedy answers on the held-out prompts, split by whether the teacher's own
    held-out response was right: exact match on each part, and on the part the teacher got wrong,
    how often the student repeats the teacher's wrong answer (it learnt the teacher's mistake)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkd.teacher.samples import read_teacher_samples
    from pkd.toy.tasks import extract_answer
    from pkd.toy.train import greedy_responses

    _, samples = read_teacher_samples(Folder(str(heldout)))
    samples = [s for s in samples if s.reference is not None]
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model)
    answers = [extract_answer(r) for r in greedy_responses(net, tokenizer, [s.messages[-1]["content"] for s in samples])]
    right = [(a, s) for a, s in zip(answers, samples) if is_correct(s, s.response)]
    wrong = [(a, s) for a, s in zip(answers, samples) if not is_correct(s, s.response)]
    return {
        "teacher_right": {"prompts": len(right), "exact_match": _share(a == s.reference for a, s in right)},
        "teacher_wrong": {
            "prompts": len(wrong),
            "exact_match": _share(a == s.reference for a, s in wrong),
            "repeats_teacher": _share(a == extract_answer(s.response) for a, s in wrong),
        },
    }


def _share(hits: Any) -> float | None:
    hits = list(hits)
    return sum(hits) / len(hits) if hits else None
