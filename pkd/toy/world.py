"""The toy world the demo runs Proxy-KD on: a trained teacher, a misaligned proxy, a weak student.

`build_world(root)` trains, on CPU in a few minutes, everything the demo needs and caches it:

- one tokenizer (both solution styles, so student and proxy share it with the teacher);
- the TEACHER (the black box, served later by vLLM): SFT on teacher-style worked solutions until
  its exact-match accuracy on its own validation prompts reaches TARGET_ACCURACY;
- the PROXY (bigger than the student): SFT on the *proxy* style over a slightly shifted task
  distribution, so it knows the arithmetic but disagrees with the teacher's tokens until aligned;
- the STUDENT base: a brief generic language-model pass over both styles as plain text (no chat
  turns), so it knows the tokens but cannot yet answer a chat prompt;
- train / held-out prompts in the `pkd teacher-sample` input format.

No held-out question is ever trained on by any model. `world.json`, written last, holds the spec
and a report (sizes, accuracies, agreement, timings); a second call with the same spec returns at
once. A different spec (e.g. quick vs full) rebuilds in place, so keep them under different roots.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pkd.toy.tasks import (
    STYLES,
    TaskSpec,
    chat_example,
    extract_answer,
    make_prompt_split,
    sample_problems,
    write_prompts,
)

MARKER = "world.json"
FORMAT = 1  # bump when the recipe below changes what a world contains
TARGET_ACCURACY = 0.9
PROXY_SPEC = TaskSpec(first=(1, 30), steps=(1, 3))  # related to TaskSpec(), not equal to it


@dataclass(frozen=True)
class ModelRecipe:
    """Architecture and training of one member. head_dim = hidden / heads = 32 for all (vLLM CPU
    kernels support it); 4+ heads matter: with 2 heads the teacher failed to gather the two
    operands and the operator of a step and stalled near 50% accuracy."""

    hidden: int
    layers: int
    heads: int
    examples: int  # distinct training problems
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
    vocab_size: int
    teacher: ModelRecipe
    proxy: ModelRecipe
    student: ModelRecipe
    extra_teacher_rounds: int  # more steps, at most this many times, if the target is missed
    format: int = FORMAT


FULL = WorldSpec(
    seed=0,
    n_train=2000,
    n_heldout=200,
    n_validation=200,
    vocab_size=512,
    teacher=ModelRecipe(hidden=128, layers=2, heads=4, examples=8000, steps=500, batch_size=64, lr=3e-3),
    proxy=ModelRecipe(hidden=192, layers=2, heads=6, examples=8000, steps=400, batch_size=64, lr=3e-3),
    student=ModelRecipe(hidden=64, layers=2, heads=2, examples=2000, steps=40, batch_size=64, lr=3e-3),
    extra_teacher_rounds=3,
)
QUICK = replace(
    FULL,
    n_train=400,
    n_heldout=100,
    n_validation=100,
    teacher=replace(FULL.teacher, examples=4000, steps=200),
    proxy=replace(FULL.proxy, examples=2000, steps=100),
    student=replace(FULL.student, examples=500, steps=20),
    extra_teacher_rounds=1,
)


@dataclass(frozen=True)
class ToyWorld:
    """Paths of a built world, and its report (the `report` part of world.json)."""

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
    threads: int = 2,
    log: Callable[[str], None] | None = None,
) -> ToyWorld:
    """Build (or find, if its marker matches) the toy world under `root`. `threads` caps torch's
    CPU threads during the build (restored afterwards); `log` receives one line per phase."""
    root = Path(root)
    spec = replace(QUICK if quick else FULL, seed=seed)
    spec_json = json.loads(json.dumps(asdict(spec)))
    marker = root / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found.get("spec") == spec_json:
            return ToyWorld.at(root, found["report"])
    import torch

    say = log or (lambda _msg: None)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        marker.unlink(missing_ok=True)
        report = _build(root, spec, say)
    finally:
        torch.set_num_threads(old_threads)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": spec_json, "report": report}, indent=2))
    tmp.replace(marker)
    return ToyWorld.at(root, report)


class _Clock:
    """Wall and CPU seconds per phase, for the report."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._start = time.monotonic()

    def lap(self, name: str, wall0: float, cpu0: float) -> None:
        self.phases[name] = {
            "wall_s": round(time.monotonic() - wall0, 1),
            "cpu_s": round(time.process_time() - cpu0, 1),
        }

    def total(self) -> float:
        return round(time.monotonic() - self._start, 1)


def _build(root: Path, spec: WorldSpec, say: Callable[[str], None]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from pkd.tiny import build_llama, train_tokenizer
    from pkd.toy.train import agreement, chat_examples, greedy_responses, train_sft

    world, clock = ToyWorld.at(root, {}), _Clock()
    for path in (world.tokenizer, world.teacher, world.proxy, world.student):
        shutil.rmtree(path, ignore_errors=True)

    # Prompts: the demo's train/held-out split first; every training set below excludes held-out.
    w0, c0 = time.monotonic(), time.process_time()
    train, heldout = make_prompt_split(spec.n_train, spec.n_heldout, seed=spec.seed)
    write_prompts(train, world.prompts_train)
    write_prompts(heldout, world.prompts_heldout)
    held_q = [r["messages"][-1]["content"] for r in heldout]
    held_ref = [r["reference"] for r in heldout]
    banned = frozenset(held_q)
    validation = sample_problems(spec.n_validation, spec.seed + 1, exclude=banned)
    banned |= {p.question for p in validation}
    data = {
        "teacher": sample_problems(spec.teacher.examples, spec.seed + 2, exclude=banned),
        "proxy": sample_problems(spec.proxy.examples, spec.seed + 3, PROXY_SPEC, exclude=banned),
        "student": sample_problems(spec.student.examples, spec.seed + 4, exclude=banned),
    }
    corpus = ["user", "assistant", "system"] * 10  # role names get merged like any word
    for p in data["student"]:
        corpus += [p.question, *(style(p) for style in STYLES.values())]
    tokenizer = train_tokenizer(corpus, spec.vocab_size, world.tokenizer)
    pad = tokenizer.pad_token_id
    clock.lap("data_and_tokenizer", w0, c0)
    say(f"toy world: tokenizer of {len(tokenizer)} tokens, {len(train)} train / {len(heldout)} held-out prompts")

    def build(name: str, offset: int) -> Any:
        r: ModelRecipe = getattr(spec, name)
        path = build_llama(
            world.tokenizer, getattr(world, name),
            hidden_size=r.hidden, num_layers=r.layers, num_heads=r.heads,
            seed=spec.seed + offset, max_position_embeddings=256,
        )  # fmt: skip
        return AutoModelForCausalLM.from_pretrained(path)

    def accuracy(model: Any, questions: list[str], refs: list[str]) -> tuple[float, list[str]]:
        responses = greedy_responses(model, tokenizer, questions)
        return sum(extract_answer(t) == r for t, r in zip(responses, refs)) / len(refs), responses

    # Teacher: SFT on its style until its validation accuracy reaches the target.
    w0, c0 = time.monotonic(), time.process_time()
    r = spec.teacher
    teacher = build("teacher", 0)
    examples = chat_examples(tokenizer, [chat_example(p, "teacher") for p in data["teacher"]])
    val_q, val_ref = [p.question for p in validation], [str(p.answer) for p in validation]
    fit = train_sft(teacher, examples, steps=r.steps, batch_size=r.batch_size, lr=r.lr, pad_id=pad, seed=spec.seed)
    val_acc, _ = accuracy(teacher, val_q, val_ref)
    rounds = 0
    while val_acc < TARGET_ACCURACY and rounds < spec.extra_teacher_rounds:
        rounds += 1
        say(f"toy world: teacher at {val_acc:.1%} on validation, training more (round {rounds})")
        fit = train_sft(
            teacher, examples, steps=r.steps // 2, batch_size=r.batch_size, lr=r.lr / 3,
            pad_id=pad, seed=spec.seed + rounds, warmup=0,
        )  # fmt: skip
        val_acc, _ = accuracy(teacher, val_q, val_ref)
    teacher_acc, teacher_resp = accuracy(teacher, held_q, held_ref)
    teacher.save_pretrained(world.teacher, safe_serialization=True)
    clock.lap("teacher", w0, c0)
    say(f"toy world: teacher held-out accuracy {teacher_acc:.1%} ({clock.phases['teacher']['wall_s']} s)")

    # What "agreement with the teacher" is measured on: its own greedy held-out responses.
    teacher_chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": t}]
        for q, t in zip(held_q, teacher_resp)
    ]
    teacher_tokens = chat_examples(tokenizer, teacher_chats)
    members: dict[str, dict[str, Any]] = {
        "teacher": {
            **_size(spec.teacher, teacher, examples),
            "final_loss": round(fit["final_loss"], 4),
            "extra_rounds": rounds,
            "validation_accuracy": val_acc,
            "heldout_accuracy": teacher_acc,
        }
    }
    del teacher
    # Proxy: its own style, shifted distribution; student: plain text of both styles, briefly.
    for name, offset, style in (("proxy", 1, "proxy"), ("student", 2, None)):
        w0, c0 = time.monotonic(), time.process_time()
        r = getattr(spec, name)
        model = build(name, offset)
        if style is None:
            texts = [chat_example(p, s) for p in data[name] for s in STYLES]
            examples = [_plain(tokenizer, chat) for chat in texts]
        else:
            examples = chat_examples(tokenizer, [chat_example(p, style) for p in data[name]])
        fit = train_sft(model, examples, steps=r.steps, batch_size=r.batch_size, lr=r.lr, pad_id=pad, seed=spec.seed)
        acc, _ = accuracy(model, held_q, held_ref)
        agree = agreement(model, teacher_tokens, pad)
        model.save_pretrained(getattr(world, name), safe_serialization=True)
        clock.lap(name, w0, c0)
        members[name] = {
            **_size(r, model, examples),
            "final_loss": round(fit["final_loss"], 4),
            "heldout_accuracy": acc,
            "teacher_agreement": round(agree["agreement"], 4),
            "teacher_nll_per_token": round(agree["nll_per_token"], 4),
        }
        say(f"toy world: {name} held-out accuracy {acc:.1%}, agreement with teacher {agree['agreement']:.1%}")
    return {
        "teacher_heldout_accuracy": teacher_acc,
        "members": members,
        "prompts": {"train": len(train), "heldout": len(heldout)},
        "max_tokens": max(len(e.ids) for e in teacher_tokens),
        "timings": {**clock.phases, "total_wall_s": clock.total()},
    }


def _plain(tokenizer: Any, chat: list[dict[str, str]]) -> Any:
    """A chat as raw text ("question solution", no chat template), loss on every token."""
    from pkd.toy.train import Example

    text = f"{chat[0]['content']} {chat[1]['content']}"
    return Example([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]], 0)


def _size(r: ModelRecipe, model: Any, examples: list[Any]) -> dict[str, Any]:
    params = sum(p.numel() for p in model.parameters())
    return {**asdict(r), "params": params, "train_examples": len(examples)}
