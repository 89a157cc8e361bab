"""The alignment report: one row per stage (base, warmup, round-01, ...) with held-out teacher NLL
per token, top-1 agreement and task skill (exact match, lm-eval scores), which stage was selected
as the output and why, and per round the DPO reward margin/accuracy and where the time went.
Written as JSON and a PNG plot; `table()` renders it for the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Two tables of short headers so that the report fits 80 columns (terminals, CI logs, files).
QUALITY = [  # (key, header, format)
    ("stage", "stage", "{}"),
    ("nll_per_token", "NLL/tok", "{:.4f}"),
    ("top1_agreement", "top-1", "{:.3f}"),
    ("exact_match", "EM", "{:.1%}"),
    ("pairs", "pairs", "{:,}"),
    ("dropped_pairs", "equal", "{:,}"),
    ("reward_margin", "margin", "{:+.4f}"),
    ("reward_accuracy", "acc", "{:.3f}"),
]
TIMES = [
    ("stage", "stage", "{}"),
    ("gen_s", "generate", "{:.1f}"),
    ("merge_s", "merge", "{:.1f}"),
    ("ref_s", "ref logps", "{:.1f}"),
    ("train_s", "train", "{:.1f}"),
]


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], title: str, caption: str) -> Any:
    from rich.table import Table

    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for key, header, _ in columns:
        t.add_column(header, justify="left" if key == "stage" else "right")
    for row in rows:
        t.add_row(*(fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns))
    return t


def table(report: dict[str, Any]) -> Any:
    """Held-out quality and DPO rewards per stage, then where the time went (seconds)."""
    from rich.console import Group

    held = report["heldout"]
    chosen = report["selection"]["stage"]
    rows = [s | {"stage": f"{s['stage']} *" if s["stage"] == chosen else s["stage"]} for s in report["stages"]]
    quality = _table(
        rows,
        QUALITY,
        f"proxy alignment: {held['samples']} held-out teacher samples ({held['tokens']:,} tokens), split {held['from']!r}",
        "NLL/tok, top-1: held-out NLL per token and top-1 agreement with the teacher; EM: greedy exact match against "
        f"the {held.get('exact_match_rows', 0)} references (answer: {held.get('answer', 'the whole response')}); pairs "
        "(equal: dropped, proxy = teacher), margin, acc: DPO reward margin and accuracy after the round; *: the output proxy",
    )
    tasks = sorted({t for s in report["stages"] for t in ((s.get("benchmarks") or {}).get("tasks") or {})})
    if tasks:
        bench = [("stage", "stage", "{}")] + [(t, t, "{:.3f}") for t in tasks]
        flat = [{"stage": r["stage"]} | {t: next(iter(m.values()), None) for t, m in ((s.get("benchmarks") or {}).get("tasks") or {}).items()} for r, s in zip(rows, report["stages"])]
        quality = Group(quality, _table(flat, bench, "lm-eval tasks per stage (first metric)", ""))
    times = _table(
        [s for s in report["stages"] if s.get("train_s") is not None or s.get("gen_s") is not None], TIMES, "time per stage, s",
        "generate: sampling the proxy, wall time; merge: of it, folding the adapter into the base for vLLM (sample_merged)",
    )
    return Group(quality, times)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Held-out NLL and top-1 agreement by stage; reward margin and accuracy by round. False
    (nothing drawn) without matplotlib: it is the `plots` extra, the report does not need it."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    names = [s["stage"] for s in stages]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4))
    skills = [None if s.get("exact_match") is None else 100 * s["exact_match"] for s in stages]
    middle.set_title(f"task skill (selected: {report['selection']['stage']})")
    if any(v is not None for v in skills):
        middle.plot(names, [float("nan") if v is None else v for v in skills], "o-", color="tab:purple", label="greedy exact match, %")
        base = skills[0]
        if base is not None:
            floor = base - report["selection"]["max_skill_drop"]
            middle.axhline(floor, color="grey", linestyle=":", label=f"base - {report['selection']['max_skill_drop']:g} points")
        middle.set_ylim(0, 105)
        middle.legend(loc="lower left")
    else:
        middle.text(0.5, 0.5, "no references: skill not measured", ha="center", va="center", transform=middle.transAxes)
    left.plot(names, [s["nll_per_token"] for s in stages], "o-", color="tab:blue")
    left.set_ylabel("held-out NLL per token", color="tab:blue")
    agree = left.twinx()
    agree.plot(names, [s["top1_agreement"] for s in stages], "s--", color="tab:orange")
    agree.set_ylabel("top-1 agreement with teacher", color="tab:orange")
    left.set_title("proxy vs teacher on held-out samples")
    rounds = [s for s in stages if s.get("reward_margin") is not None]
    right.bar([s["stage"] for s in rounds], [s["reward_margin"] for s in rounds], color="tab:green")
    right.set_ylabel("reward margin after the round (β·Δ log-ratio)", color="tab:green")
    acc = right.twinx()
    acc.plot([s["stage"] for s in rounds], [s["reward_accuracy"] for s in rounds], "o-", color="tab:red")
    acc.set_ylim(0, 1.05)
    acc.set_ylabel("reward accuracy", color="tab:red")
    right.set_title("DPO rounds: teacher (chosen) vs proxy (rejected)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
