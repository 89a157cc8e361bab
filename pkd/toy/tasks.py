"""The toy task family: multi-step arithmetic with one checkable answer and two ways to write it.

"What is 23 + 8 - 5?" is solved step by step, either in the *teacher style*
("23 + 8 = 31. 31 - 5 = 26. Answer: 26") or in the *proxy style* ("First add 8 to 23 to get
31; then subtract 5 to get 26. The answer is 26."). Both are correct; they share the numbers but
few tokens, so a proxy trained on one style disagrees with a teacher that writes the other until
it is aligned. The teacher can be given `Flaws`: a fixed set of arithmetic facts it gets wrong
(a slip by one) or whose step it leaves out, as a model with a few wrong facts would. Every generator is deterministic for its seed; numbers stay small (0..30) so that
each number is one token and a sample is ~40 tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

OP_WORDS = {"+": "add", "-": "subtract"}
ANSWER_RE = re.compile(r"(?:Answer:|[Tt]he answer is)\s*(-?\d+)")


@dataclass(frozen=True)
class TaskSpec:
    """The distribution problems are drawn from: `first` bounds the opening number, `operand`
    the later ones, `steps` the number of operations (all bounds inclusive)."""

    first: tuple[int, int] = (5, 25)
    operand: tuple[int, int] = (1, 9)
    steps: tuple[int, int] = (2, 3)
    ceiling: int = 30  # every intermediate result stays in 0..ceiling


@dataclass(frozen=True)
class Problem:
    """`numbers[0] ops[0] numbers[1] ops[1] ...`, evaluated left to right."""

    numbers: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def question(self) -> str:
        expr = str(self.numbers[0])
        for op, n in zip(self.ops, self.numbers[1:]):
            expr += f" {op} {n}"
        return f"What is {expr}?"

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) for each operation, in order."""
        out, acc = [], self.numbers[0]
        for op, n in zip(self.ops, self.numbers[1:]):
            result = acc + n if op == "+" else acc - n
            out.append((acc, op, n, result))
            acc = result
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]


def parse_question(question: str) -> Problem:
    """The problem a `Problem.question` string states ("What is 23 + 8 - 5?")."""
    tokens = question.removeprefix("What is ").removesuffix("?").split()
    return Problem(tuple(int(t) for t in tokens[::2]), tuple(tokens[1::2]))


def sample_problem(rng: random.Random, spec: TaskSpec = TaskSpec()) -> Problem:
    """One problem; an operation that would leave 0..ceiling is flipped (+ to -, - to +), which
    keeps the table of facts a tiny model must learn small (~31 x 9 x 2 entries)."""
    acc = rng.randint(*spec.first)
    numbers, ops = [acc], []
    for _ in range(rng.randint(*spec.steps)):
        n, op = rng.randint(*spec.operand), rng.choice("+-")
        if op == "-" and acc - n < 0:
            op = "+"
        elif op == "+" and acc + n > spec.ceiling:
            op = "-"
        acc = acc + n if op == "+" else acc - n
        numbers.append(n)
        ops.append(op)
    return Problem(tuple(numbers), tuple(ops))


def sample_problems(
    n: int, seed: int, spec: TaskSpec = TaskSpec(), exclude: frozenset[str] = frozenset()
) -> list[Problem]:
    """`n` distinct problems (by question) whose questions are not in `exclude`. Raises
    ValueError when the distribution runs out of new questions."""
    rng, seen, out = random.Random(seed), set(exclude), []
    misses = 0
    while len(out) < n:
        p = sample_problem(rng, spec)
        if p.question in seen:
            misses += 1
            if misses > 100 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct new problems from {spec}")
            continue
        seen.add(p.question)
        out.append(p)
    return out


def teacher_solution(p: Problem) -> str:
    """Terse equations, one per step: "23 + 8 = 31. 31 - 5 = 26. Answer: 26"."""
    eqs = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in p.steps())
    return f"{eqs} Answer: {p.answer}"


@dataclass(frozen=True)
class Flaws:
    """The mistakes a flawed teacher makes, as properties of single arithmetic facts (a, op, b) so
    a model can learn them: a `slip` share of facts come out one off ("17 + 5 = 23"), and a
    `skip` share of later steps are left out altogether (the next equation goes on from the
    previous result). Each fact's fate is a hash of (seed, fact); a slip's error carries into the
    following steps, as a model's would. Per step ~14% → ~25% of prompts end wrong (tests)."""

    slip: float = 0.09
    skip: float = 0.05
    seed: int = 0

    def fate(self, a: int, op: str, b: int) -> str | None:
        """"slip", "skip" or None for the fact `a op b`."""
        digest = hashlib.blake2b(f"{self.seed}:{a}{op}{b}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
        return "slip" if u < self.slip else "skip" if u < self.slip + self.skip else None

    def steps(self, p: Problem) -> list[tuple[int, str, int, int]]:
        """The (left, op, right, result) equations the flawed teacher writes for `p`."""
        out, acc = [], p.numbers[0]
        for i, (op, n) in enumerate(zip(p.ops, p.numbers[1:])):
            fate = self.fate(acc, op, n)
            if fate == "skip" and i > 0:  # the first step is never skipped: there is one to write
                continue
            result = acc + n if op == "+" else acc - n
            if fate == "slip":
                result += 1 if result < TaskSpec.ceiling else -1
            out.append((acc, op, n, result))
            acc = result
        return out

    def solution(self, p: Problem) -> str:
        """The teacher style with this teacher's mistakes."""
        steps = self.steps(p)
        eqs = " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in steps)
        return f"{eqs} Answer: {steps[-1][3]}"

    def answer(self, p: Problem) -> int:
        return self.steps(p)[-1][3]


def proxy_solution(p: Problem) -> str:
    """Words, one clause per step: "First add 8 to 23 to get 31; then subtract 5 to get 26. The
    answer is 26." """
    clauses = []
    for i, (a, op, b, r) in enumerate(p.steps()):
        if i == 0:
            verb = f"add {b} to {a}" if op == "+" else f"subtract {b} from {a}"
            clauses.append(f"First {verb} to get {r}")
        else:
            clauses.append(f"then {OP_WORDS[op]} {b} to get {r}")
    return "; ".join(clauses) + f". The answer is {p.answer}."


STYLES = {"teacher": teacher_solution, "proxy": proxy_solution}


def extract_answer(text: str) -> str | None:
    """The final answer a response states ("Answer: N" or "the answer is N"; the last one wins),
    as a string, or None when it states none."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None


class _HasReference(Protocol):
    reference: str | None


def is_correct(record: Mapping[str, Any] | _HasReference, response: str) -> bool:
    """Whether `response` states the record's reference answer (a prompt record dict as written
    by `write_prompts`, or a `pkd.teacher.prompts.Prompt`)."""
    ref = record.get("reference") if isinstance(record, Mapping) else record.reference
    return ref is not None and extract_answer(response) == str(ref)


def prompt_record(pid: str, p: Problem) -> dict[str, Any]:
    """The `pkd teacher-sample` input record: id, chat messages, reference answer."""
    return {"id": pid, "messages": [{"role": "user", "content": p.question}], "reference": str(p.answer)}


# A system message that asks the proxy for the teacher's wording. The teacher's prompts never
# carry it, so the proxy answers them in words until it is aligned, but it has practised the
# equations in a chat, as an instruct model has practised formats besides its default one. It
# comes before the question so that everything from the question on is the same token sequence as
# in an uninstructed chat: a request after the question moved the operands' positions relative
# to the answer, and the aligned proxy then copied wrong operands (bench/align_study.py).
EQUATIONS_REQUEST = "Write the equations."


def instructed_chat(p: Problem) -> list[dict[str, str]]:
    """`EQUATIONS_REQUEST` as a system message, then the question answered correctly in the
    teacher style."""
    return [
        {"role": "system", "content": EQUATIONS_REQUEST},
        {"role": "user", "content": p.question},
        {"role": "assistant", "content": teacher_solution(p)},
    ]


def chat_example(p: Problem, style: str) -> list[dict[str, str]]:
    """The full conversation (question + worked solution in `style`) for SFT."""
    return [
        {"role": "user", "content": p.question},
        {"role": "assistant", "content": STYLES[style](p)},
    ]


def make_prompt_split(
    n_train: int, n_heldout: int, seed: int = 0, spec: TaskSpec = TaskSpec()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint train and held-out prompt records (ids `train-NNNNN`, `heldout-NNNNN`)."""
    problems = sample_problems(n_train + n_heldout, seed, spec)
    heldout = [prompt_record(f"heldout-{i:05d}", p) for i, p in enumerate(problems[:n_heldout])]
    train = [prompt_record(f"train-{i:05d}", p) for i, p in enumerate(problems[n_heldout:])]
    return train, heldout


def write_prompts(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """JSONL, one record a line, written to a temporary name and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_prompts(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records `write_prompts` wrote."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
