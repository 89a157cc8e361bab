"""The demo's comparison: per-variant mean ± std over seeds, as JSON, a rich table and a chart."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkd.toy.variants import VARIANTS

if TYPE_CHECKING:
    from rich.table import Table

    from pkd.toy.world import ToyWorld

METRICS = ("exact_match", "nll_per_token", "top1_agreement")


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value) and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def paired(scores: dict[str, dict[str, dict[str, Any]]], a: str, b: str, seeds: Sequence[int]) -> dict[str, Any]:
    """Per-seed differences a − b (same seed: same data order), their mean and a 95% t-interval."""
    out = {}
    for m in METRICS:
        diffs = [float(scores[a][str(s)][m]) - float(scores[b][str(s)][m]) for s in seeds]
        mean = statistics.fmean(diffs)
        half = _T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
        out[m] = {"mean": mean, "ci95": None if half is None else [mean - half, mean + half], "values": diffs}
    return out


_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student t, two-sided 95%


def summarize(
    scores: dict[str, dict[str, dict[str, Any]]],
    world: ToyWorld,
    seeds: Sequence[int],
    *,
    quick: bool,
    timings: dict[str, float],
    commands: list[str],
) -> dict[str, Any]:
    """`scores[key][seed or "all"]` are `pkd eval` reports; the result is what results.json holds."""
    def metrics(key: str) -> dict[str, Any]:
        reports = list(scores[key].values())
        return {m: _spread([float(r[m]) for r in reports]) for m in METRICS} | {"samples": reports[0]["rows"]}

    variants = [{"key": v.key, "label": v.label, **metrics(v.key)} for v in VARIANTS]
    by_key = {v["key"]: v for v in variants}
    teacher = scores["teacher"]["all"]
    before, after = scores["proxy_before"]["all"], scores["proxy_after"]["all"]
    return {
        "mode": "quick" if quick else "full",
        "seeds": list(seeds),
        "heldout_prompts": world.report["prompts"]["heldout"],
        "teacher": {m: teacher[m] for m in METRICS},
        "proxy": {
            "before_alignment": {m: before[m] for m in METRICS},
            "after_alignment": {m: after[m] for m in METRICS},
        },
        "variants": variants,
        "proxy_kd_gain_over_blackbox_kd": {
            "exact_match_points": 100 * (by_key["proxy_kd"]["exact_match"]["mean"] - by_key["blackbox_kd"]["exact_match"]["mean"]),
            "nll_per_token": by_key["proxy_kd"]["nll_per_token"]["mean"] - by_key["blackbox_kd"]["nll_per_token"]["mean"],
        },
        "sampled_minus_topk20": paired(scores, "sampled_cache", "proxy_kd", seeds),
        "world": world.report,
        "timings_s": timings,
        "commands": commands,
    }


def results_table(results: dict[str, Any]) -> Table:
    """The comparison as a rich table; teacher and proxy figures in the caption."""
    from rich.table import Table

    n = len(results["seeds"])
    t = Table(
        title=f"Held-out results ({results['heldout_prompts']} prompts; mean ± std over {n} seed{'s' * (n > 1)})",
        title_justify="left",
    )
    t.add_column("student")
    t.add_column("exact match", justify="right")
    t.add_column("NLL/token", justify="right")  # of the teacher's responses; short: 80 columns
    t.add_column("top-1 agree", justify="right")
    for v in results["variants"]:
        em, nll, agree = (v[m] for m in METRICS)
        style = "bold" if v["key"] == "proxy_kd" else None
        t.add_row(
            v["label"],
            f"{100 * em['mean']:.1f}% ± {100 * em['std']:.1f}",
            f"{nll['mean']:.3f} ± {nll['std']:.3f}",
            f"{100 * agree['mean']:.1f}% ± {100 * agree['std']:.1f}",
            style=style,
        )
    teacher, proxy = results["teacher"], results["proxy"]
    gain = results["proxy_kd_gain_over_blackbox_kd"]["exact_match_points"]
    before, after = proxy["before_alignment"], proxy["after_alignment"]
    t.caption = (
        f"teacher exact match {100 * teacher['exact_match']:.1f}%; proxy top-1 agreement with the teacher "
        f"{100 * before['top1_agreement']:.1f}% before alignment, {100 * after['top1_agreement']:.1f}% after "
        f"(proxy exact match {100 * before['exact_match']:.1f}% → {100 * after['exact_match']:.1f}%); "
        f"Proxy-KD − black-box KD: {gain:+.1f} points exact match"
    )
    d = results["sampled_minus_topk20"]["nll_per_token"]
    interval = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else " (one seed: no interval)"
    t.caption += f"; sampled (N = 12) − top-20 NLL per token, paired over seeds: {d['mean']:+.3f}{interval}"
    if "cache_bytes_per_token" in results:
        b = results["cache_bytes_per_token"]
        t.caption += f"; cache bytes/token: top-20 {b['aligned']:.1f}, sampled {b['sampled']:.1f} ({b['sampled'] / b['aligned']:.2f}×)"
    return t


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Bars with ±std error bars: exact match and NLL per variant; proxy agreement before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    labels = [v["label"].replace(", ", ",\n").replace(" (", "\n(") for v in variants]
    colors = ["tab:gray", "tab:blue", "tab:purple", "tab:orange", "tab:green", "tab:olive"]
    fig, (em_ax, nll_ax, proxy_ax) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 3, 1.2]})
    for ax, metric, scale, title in (
        (em_ax, "exact_match", 100, "exact match on held-out prompts (%)"),
        (nll_ax, "nll_per_token", 1, "NLL / token of held-out teacher responses"),
    ):
        means = [scale * v[metric]["mean"] for v in variants]
        stds = [scale * v[metric]["std"] for v in variants]
        bars = ax.bar(range(len(variants)), means, yerr=stds, capsize=4, color=colors)
        ax.set_xticks(range(len(variants)), labels, fontsize=8)
        ax.set_title(title)
        ax.bar_label(bars, fmt="%.3g", fontsize=8, label_type="center")
    nll_ax.set_yscale("log")  # the undistilled base is ~20x the trained students
    em_ax.axhline(100 * results["teacher"]["exact_match"], color="black", linestyle="--", linewidth=1, label="teacher")
    em_ax.legend(loc="upper left")
    proxy = results["proxy"]
    proxy_ax.bar(
        [0, 1],
        [100 * proxy["before_alignment"]["top1_agreement"], 100 * proxy["after_alignment"]["top1_agreement"]],
        color=["tab:purple", "tab:green"],
    )
    proxy_ax.set_xticks([0, 1], ["before", "after"])
    proxy_ax.set_ylim(0, 100)
    proxy_ax.set_title("proxy top-1 agreement\nwith the teacher (%)")
    n = len(results["seeds"])
    fig.suptitle(f"pkd demo ({results['mode']}): mean ± std over {n} seed{'s' * (n > 1)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
