"""The toy world the demo runs Proxy-KD on: a trained teacher, a misaligned proxy, a weak student.

`build_world(root)` trains, on CPU in a few minutes, everything the demo needs and caches it:

- one tokenizer over both solution styles, shared by all three models;
- the TEACHER (the black box, served later by vLLM): SFT on teacher-style chats written with its
  `Flaws` (a few wrong arithmetic facts, a few steps it leaves out: ~25% of its answers are
  wrong), until it reproduces its own intended answers on validation prompts at TARGET_ACCURACY;
  held-out prompts keep the *correct* answer as their reference;
- a GENERIC corpus: problems with solutions in both styles as plain text (question, newline,
  solution; no chat turns), standing in for web pre-training text;
- the PROXY (bigger than the student): the generic corpus plus chats over a shifted task
  distribution, in the *proxy* style, and in the teacher's equations where the user asks for
  them ("... Write the equations."), which the teacher's prompts never do. So it answers the
  teacher's prompts in words and disagrees with the teacher until aligned, but it knows the
  arithmetic in both wordings inside a chat: the proxy Proxy-KD assumes. (Without the asked-for
  equations it knew them only as plain text: teacher-forced in a chat its computed digits were
  78% right against 99% in plain text, and every alignment recipe that taught it the teacher's
  format cost it its arithmetic; bench/align_study.py, docs/alignment-study.md.)
- the STUDENT base: a brief pass over the generic corpus only, so it knows the tokens but has no
  chat habits and little arithmetic;
- train / held-out prompts in the `pkd teacher-sample` input format.

No model trains on a held-out question. `world.json`, written last, holds the spec and a report
(sizes, accuracies, agreement, timings); a second call with the same spec returns at once. Any
other spec (quick vs full, another seed) rebuilds in place, so give each its own root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkd.progress import status
from pkd.toy.tasks import (
    STYLES,
    Flaws,
    Problem,
    TaskSpec,
    chat_example,
    extract_answer,
    instructed_chat,
    make_prompt_split,
    parse_question,
    sample_problems,
    write_prompts,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pkd.toy.train import Example

MARKER = "world.json"
FORMAT = 3  # bump when the build below changes what a world contains
TARGET_ACCURACY = 0.9
PROXY_SPEC = TaskSpec(first=(1, 30), steps=(1, 3))  # related to TaskSpec(), not equal to it


@dataclass(frozen=True)
class ModelRecipe:
    """Architecture and training of one member. head_dim = hidden / heads = 32 everywhere (a
    vLLM CPU kernel size). Heads matter more than width here: with 2 heads the teacher could not
    gather both operands and the operator of a step and stalled near 50% accuracy; with 4 it
    reaches ~100%. The student keeps 2 heads, which is what leaves distillation room to work."""

    hidden: int
    layers: int
    heads: int
    steps: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class WorldSpec:
    """Everything a world is built from; the marker stores it, and a different one rebuilds."""

    seed: int
    n_train: int  # prompts the demo samples the teacher on (then splits into D_w / D_p / D_s)
    n_heldout: int  # prompts every comparison is evaluated on
    n_validation: int  # the teacher's own stopping check, disjoint from held-out
    n_teacher: int  # distinct problems in the teacher's SFT set
    n_proxy: int  # distinct problems in the proxy's chat set (its own style)
    n_instructed: int  # distinct problems in its chats that ask for the teacher's equations
    n_generic: int  # distinct problems in the generic corpus (x2: one text per style)
    vocab_size: int  # upper bound: BPE stops early once no pair is left to merge
    teacher: ModelRecipe
    proxy: ModelRecipe
    student: ModelRecipe
    extra_teacher_rounds: int  # half-length rounds at a third of the lr while below target
    flaws: Flaws = Flaws()  # the teacher's mistakes; Flaws(0, 0) is an error-free teacher
    format: int = FORMAT


FULL = WorldSpec(
    seed=0,
    n_train=1000,
    n_heldout=400,
    n_validation=200,
    n_teacher=8000,
    n_proxy=8000,
    n_instructed=4000,
    n_generic=4000,
    vocab_size=512,
    teacher=ModelRecipe(hidden=128, layers=2, heads=4, steps=400, batch_size=64, lr=3e-3),
    proxy=ModelRecipe(hidden=192, layers=2, heads=6, steps=500, batch_size=64, lr=3e-3),
    student=ModelRecipe(hidden=64, layers=2, heads=2, steps=40, batch_size=64, lr=3e-3),
    extra_teacher_rounds=3,
)
QUICK = replace(
    FULL,
    n_train=300,
    n_heldout=100,
    n_validation=100,
    n_teacher=4000,
    n_proxy=2000,
    n_instructed=1000,
    n_generic=1000,
    teacher=replace(FULL.teacher, steps=200),
    proxy=replace(FULL.proxy, steps=100, batch_size=32),
    student=replace(FULL.student, steps=20),
    extra_teacher_rounds=0,
)


@dataclass(frozen=True)
class ToyWorld:
    """Paths of a built world (every model dir holds the shared tokenizer too) and its report."""

    root: Path
    tokenizer: Path
    teacher: Path
    proxy: Path
    student: Path
    prompts_train: Path
    prompts_heldout: Path
    report: dict[str, Any]

    @classmethod
    def at(cls, root: Path, report: dict[str, Any]) -> ToyWorld:
        return cls(
            root=root,
            tokenizer=root / "tokenizer",
            teacher=root / "teacher",
            proxy=root / "proxy",
            student=root / "student",
            prompts_train=root / "prompts" / "train.jsonl",
            prompts_heldout=root / "prompts" / "heldout.jsonl",
            report=report,
        )


def build_world(
    root: str | os.PathLike,
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int = 1,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> ToyWorld:
    """Build (or find, if its marker matches) the toy world under `root`; `log` receives one line
    per phase, and `progress` shows a spinner while it trains (minutes in which nothing else moves). `threads` sets torch's CPU threads during the build (restored afterwards). One is
    the default because these models are tiny: on an idle 2-core host 2 threads were ~1.5x
    faster per step, but with one core busy elsewhere they were 5-10x *slower* (spin-waiting)."""
    root = Path(root)
    spec = replace(QUICK if quick else FULL, seed=seed)
    spec = replace(spec, flaws=replace(spec.flaws, seed=seed))
    spec_json = json.loads(json.dumps(asdict(spec)))
    marker = root / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found.get("spec") == spec_json:
            return ToyWorld.at(root, found["report"])
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        marker.unlink(missing_ok=True)
        with status("toy world: training the teacher, proxy and student", enabled=progress):
            report = _build(root, spec, log or (lambda _line: None))
    finally:
        torch.set_num_threads(old_threads)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": spec_json, "report": report}, indent=2))
    tmp.replace(marker)
    return ToyWorld.at(root, report)


@contextlib.contextmanager
def _timed(timings: dict[str, dict[str, float]], name: str) -> Iterator[None]:
    """Record the wall and CPU seconds of a phase (CPU time shows contention on a busy host)."""
    wall, cpu = time.monotonic(), time.process_time()
    yield
    timings[name] = {
        "wall_s": round(time.monotonic() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
    }


def _build(root: Path, spec: WorldSpec, say: Callable[[str], None]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from pkd.models.tiny import build_llama, train_tokenizer
    from pkd.toy.train import agreement, chat_examples, greedy_responses, train_sft

    start, timings = time.monotonic(), {}
    world = ToyWorld.at(root, {})
    for path in (world.tokenizer, world.teacher, world.proxy, world.student):
        shutil.rmtree(path, ignore_errors=True)

    with _timed(timings, "data"):
        train, heldout = make_prompt_split(spec.n_train, spec.n_heldout, seed=spec.seed)
        write_prompts(train, world.prompts_train)
        write_prompts(heldout, world.prompts_heldout)
        held_q = [r["messages"][-1]["content"] for r in heldout]
        held_ref = [r["reference"] for r in heldout]
        held_problems = [parse_question(q) for q in held_q]
        banned = frozenset(held_q)  # no training set below holds a held-out question
        validation = sample_problems(spec.n_validation, spec.seed + 1, exclude=banned)
        banned |= {p.question for p in validation}
        teacher_set = sample_problems(spec.n_teacher, spec.seed + 2, exclude=banned)
        proxy_set = sample_problems(spec.n_proxy, spec.seed + 3, PROXY_SPEC, exclude=banned)
        instructed_set = sample_problems(spec.n_instructed, spec.seed + 5, PROXY_SPEC, exclude=banned)
        generic_set = sample_problems(spec.n_generic, spec.seed + 4, exclude=banned)
        corpus = ["user", "assistant", "system"] * 10  # role names get merges like any word
        corpus += [_plain_text(p, style) for p in generic_set for style in STYLES]
        tokenizer = train_tokenizer(corpus, spec.vocab_size, world.tokenizer)
        generic = [_plain(tokenizer, p, style) for p in generic_set for style in STYLES]
    say(f"toy world: {len(tokenizer)}-token vocabulary, {len(train)} train / {len(heldout)} held-out prompts")

    def new_model(name: str, offset: int) -> PreTrainedModel:
        r: ModelRecipe = getattr(spec, name)
        path = build_llama(
            world.tokenizer, getattr(world, name),
            hidden_size=r.hidden, num_layers=r.layers, num_heads=r.heads, seed=spec.seed + offset,
        )  # fmt: skip
        return AutoModelForCausalLM.from_pretrained(path)

    def fit(model: PreTrainedModel, r: ModelRecipe, examples: list[Example], **kw: Any) -> float:
        kw = {"steps": r.steps, "lr": r.lr, "seed": spec.seed, **kw}
        return train_sft(model, examples, batch_size=r.batch_size, pad_id=tokenizer.pad_token_id, **kw)

    def accuracy(model: PreTrainedModel, questions: list[str], refs: list[str]) -> tuple[float, list[str]]:
        responses = greedy_responses(model, tokenizer, questions)
        return sum(extract_answer(t) == r for t, r in zip(responses, refs)) / len(refs), responses

    members: dict[str, dict[str, Any]] = {}
    with _timed(timings, "teacher"):
        r, teacher = spec.teacher, new_model("teacher", 0)
        flaws = spec.flaws
        examples = chat_examples(tokenizer, [_flawed_chat(p, flaws) for p in teacher_set])
        # The stopping check: does it say what it was taught to say (its mistakes included)?
        val_q, val_ref = [p.question for p in validation], [str(flaws.answer(p)) for p in validation]
        loss = fit(teacher, r, examples)
        val_acc, _ = accuracy(teacher, val_q, val_ref)
        rounds = 0
        while val_acc < TARGET_ACCURACY and rounds < spec.extra_teacher_rounds:
            rounds += 1
            say(f"toy world: teacher at {val_acc:.1%} on validation; training on (round {rounds})")
            loss = fit(teacher, r, examples, steps=r.steps // 2, lr=r.lr / 3, seed=spec.seed + rounds, warmup=0)
            val_acc, _ = accuracy(teacher, val_q, val_ref)
        acc, responses = accuracy(teacher, held_q, held_ref)
        held_flawed = [str(flaws.answer(p)) for p in held_problems]
        teacher.save_pretrained(world.teacher, safe_serialization=True)
        members["teacher"] = {
            **_describe(r, teacher, len(examples), loss),
            "extra_rounds": rounds,
            "validation_fidelity": val_acc,
            "heldout_accuracy": acc,
            "heldout_fidelity": sum(extract_answer(t) == a for t, a in zip(responses, held_flawed)) / len(responses),
            "heldout_taught_accuracy": sum(a == r for a, r in zip(held_flawed, held_ref)) / len(held_ref),
        }
        del teacher
    say(f"toy world: teacher held-out accuracy {acc:.1%}, as taught {members['teacher']['heldout_fidelity']:.1%} ({timings['teacher']['wall_s']} s)")

    # Agreement with the teacher is measured on its own greedy held-out replies, as the demo does.
    replies = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": t}]
        for q, t in zip(held_q, responses)
    ]
    teacher_tokens = chat_examples(tokenizer, replies)
    proxy_chats = chat_examples(tokenizer, [chat_example(p, "proxy") for p in proxy_set] + [instructed_chat(p) for p in instructed_set])
    for name, offset, examples in (("proxy", 1, proxy_chats + generic), ("student", 2, generic)):
        with _timed(timings, name):
            r, model = getattr(spec, name), new_model(name, offset)
            loss = fit(model, r, examples)
            acc, _ = accuracy(model, held_q, held_ref)
            agree = agreement(model, teacher_tokens, tokenizer.pad_token_id)
            model.save_pretrained(getattr(world, name), safe_serialization=True)
            members[name] = {
                **_describe(r, model, len(examples), loss),
                "heldout_accuracy": acc,
                "teacher_agreement": round(agree["agreement"], 4),
                "teacher_nll_per_token": round(agree["nll_per_token"], 4),
            }
        say(f"toy world: {name} held-out accuracy {acc:.1%}, top-1 agreement with the teacher {agree['agreement']:.1%}")
    return {
        "teacher_heldout_accuracy": members["teacher"]["heldout_accuracy"],
        "members": members,
        "vocab_size": len(tokenizer),
        "prompts": {"train": len(train), "heldout": len(heldout)},
        "max_sample_tokens": max(len(e.ids) for e in teacher_tokens),
        "timings": {**timings, "total_wall_s": round(time.monotonic() - start, 1)},
    }


def _flawed_chat(p: Problem, flaws: Flaws) -> list[dict[str, str]]:
    """A teacher SFT chat: the question and the flawed teacher's worked solution."""
    return [{"role": "user", "content": p.question}, {"role": "assistant", "content": flaws.solution(p)}]


def _plain_text(p: Problem, style: str) -> str:
    """Question, newline, solution. The newline matters: a solution then opens with the same
    space-less number token as a chat reply does, so that token is trained in every model (LoRA
    alignment cannot reach an embedding or output row left at random init)."""
    return f"{p.question}\n{STYLES[style](p)}"


def _plain(tokenizer: PreTrainedTokenizerBase, p: Problem, style: str) -> Example:
    """A generic-corpus example: bos + plain text, loss on every token."""
    from pkd.toy.train import Example

    ids = tokenizer(_plain_text(p, style), add_special_tokens=False)["input_ids"]
    return Example([tokenizer.bos_token_id, *ids], 0)


def _describe(r: ModelRecipe, model: PreTrainedModel, n_examples: int, loss: float) -> dict[str, Any]:
    params = sum(t.numel() for t in model.parameters())
    return {**asdict(r), "params": params, "train_examples": n_examples, "final_loss": round(loss, 4)}
