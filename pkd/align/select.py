"""Which alignment stage becomes the proxy that cache-logits scores with (DESIGN §1, stage 1.4).

Proxy-KD needs a proxy that is both close to the teacher and still capable. Supervised warm-up
on the teacher's format and DPO's likelihood displacement can both buy agreement with skill, so
by default (`best`) the output is the stage with the lowest held-out teacher NLL among those
whose task skill stays within `max_skill_drop` points of the base proxy's; `last` keeps the
paper's choice, the last round. Only the trained stages (warm-up, rounds) are candidates: the
base proxy is the unaligned ablation, not an aligned proxy.

Skill is greedy exact match on the held-out prompts' references where they carry one, else the
mean of the lm-eval tasks' first metrics; with neither, `best` is the lowest NLL and says that
skill was not measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Selection:
    """The chosen stage (`index` 0 = warm-up, k = round k) and why, in one sentence."""

    stage: str
    index: int
    reason: str
    skill_kept: bool | None  # False: every stage lost more skill than allowed; None: skill not measured

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def skill_of(stage: dict[str, Any]) -> float | None:
    """A stage's task skill in points (0-100): exact match, else the mean lm-eval score."""
    if stage.get("exact_match") is not None:
        return 100.0 * stage["exact_match"]
    tasks = (stage.get("benchmarks") or {}).get("tasks") or {}
    scores = [next(iter(m.values())) for m in tasks.values() if m]
    return 100.0 * sum(scores) / len(scores) if scores else None


def _stage_index(name: str) -> int:
    return 0 if name == "warmup" else int(name.removeprefix("round-"))


def choose_stage(stages: list[dict[str, Any]], select: str, max_skill_drop: float) -> Selection:
    """`stages`: the report's rows in order, the base proxy first (`stage` = "base")."""
    base, trained = stages[0], stages[1:]
    if not trained:
        raise ValueError("no trained stage to choose from")
    figures = {s["stage"]: f"NLL {s['nll_per_token']:.4f}" + (f", skill {skill_of(s):.1f}" if skill_of(s) is not None else "") for s in stages}
    if select == "last":
        last = trained[-1]
        return Selection(last["stage"], _stage_index(last["stage"]), f"--select last: the last stage ({figures[last['stage']]})", None)
    base_skill = skill_of(base)
    lowest = min(trained, key=lambda s: s["nll_per_token"])
    if base_skill is None:
        return Selection(lowest["stage"], _stage_index(lowest["stage"]), f"lowest held-out teacher NLL ({figures[lowest['stage']]}); task skill not measured (no references, no eval tasks)", None)
    floor = base_skill - max_skill_drop
    kept = [s for s in trained if skill_of(s) is not None and skill_of(s) >= floor]
    if kept:
        best = min(kept, key=lambda s: s["nll_per_token"])
        return Selection(
            best["stage"], _stage_index(best["stage"]),
            f"lowest held-out teacher NLL among the stages with skill >= {floor:.1f} (base {base_skill:.1f} - {max_skill_drop:g} points): {figures[best['stage']]}",
            True,
        )  # fmt: skip
    lost = "; ".join(f"{s['stage']} {skill_of(s):.1f}" for s in trained)
    return Selection(
        lowest["stage"], _stage_index(lowest["stage"]),
        f"every stage lost more than {max_skill_drop:g} points of skill (base {base_skill:.1f}; {lost}): kept the lowest NLL ({figures[lowest['stage']]})",
        False,
    )  # fmt: skip
