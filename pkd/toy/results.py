"""The demo's comparison as JSON, rich tables and a chart: per-variant means with 95% intervals
over seeds, and *paired* differences (a seed fixes the data order for every variant)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkd.toy.stats import mean_ci, mean_of, paired_difference
from pkd.toy.variants import VARIANTS

if TYPE_CHECKING:
    from rich.console import Group

    from pkd.toy.world import ToyWorld

METRICS = ("exact_match", "nll_per_token", "top1_agreement")
# Students only: exact match on the held-out prompts the teacher answered right / wrong, and how
# often a student repeats the teacher's wrong answer there.
SPLIT_METRICS = ("em_teacher_right", "em_teacher_wrong", "repeats_teacher_error")
BASELINE = "blackbox_kd"
# The effects the demo reports, each a paired difference "a − b" over seeds.
EFFECTS = (
    ("proxy_kd", BASELINE, "Proxy-KD − black-box KD"),
    ("unaligned_proxy", BASELINE, "unaligned proxy − black-box KD"),
    ("no_weights", BASELINE, "Proxy-KD, uniform weights − black-box KD"),
    ("proxy_kd", "unaligned_proxy", "alignment (Proxy-KD − unaligned proxy)"),
    ("proxy_kd", "no_weights", "sample weights (Proxy-KD − uniform weights)"),
    ("weight_ce", "proxy_kd", "CE weighted too − Proxy-KD"),
    ("sampled_cache", "proxy_kd", "sampled cache (N = 12) − top-20 cache"),
)


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value), 95% t-interval half-width (None for one value)."""
    return mean_ci(values) | {"std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(
    scores: dict[str, dict[str, dict[str, Any]]],
    world: ToyWorld,
    seeds: Sequence[int],
    *,
    quick: bool,
    timings: dict[str, float],
    commands: list[str],
    diagnostics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`scores[key][seed or "all"]` are `pkd eval` reports; the result is what results.json holds."""

    def metrics(key: str) -> dict[str, Any]:
        reports = list(scores[key].values())
        names = METRICS + tuple(m for m in SPLIT_METRICS if all(r.get(m) is not None for r in reports))
        return {m: _spread([float(r[m]) for r in reports]) for m in names} | {"samples": reports[0]["rows"]}

    def per_seed(key: str, metric: str) -> dict[str, float]:
        return {seed: float(r[metric]) for seed, r in scores[key].items()}

    variants = [{"key": v.key, "label": v.label, **metrics(v.key)} for v in VARIANTS]

    def compared(a: str, b: str) -> tuple[str, ...]:
        both = [*scores[a].values(), *scores[b].values()]
        return METRICS + tuple(m for m in SPLIT_METRICS if all(r.get(m) is not None for r in both))

    effects = [
        {"a": a, "b": b, "label": label} | {m: paired_difference(per_seed(a, m), per_seed(b, m)) for m in compared(a, b)}
        for a, b, label in EFFECTS
    ]
    teacher = scores["teacher"]["all"]
    before = scores["proxy_before"]["all"]
    after = mean_of([{m: r[m] for m in METRICS} for r in scores["proxy_after"].values()])  # one aligned proxy per seed
    return {
        "mode": "quick" if quick else "full",
        "seeds": list(seeds),
        "heldout_prompts": world.report["prompts"]["heldout"],
        "teacher": {m: teacher[m] for m in METRICS},
        "proxy": {
            "before_alignment": {m: before[m] for m in METRICS},
            "after_alignment": after,
            "after_alignment_per_seed": {seed: {m: r[m] for m in METRICS} for seed, r in scores["proxy_after"].items()},
        },
        "variants": variants,
        "paired_effects": effects,
        "diagnostics": diagnostics or {},
        "world": world.report,
        "timings_s": timings,
        "commands": commands,
    }


def alignment_stages(reports: list[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Per proxy-align stage (base, warm-up, rounds), its held-out figures over the seeds'
    alignments (mean ± 95% CI), and which stage each alignment selected and why."""
    names = [st["stage"] for st in reports[0]["stages"]]
    stages = []
    for name in names:
        rows = [next(st for st in r["stages"] if st["stage"] == name) for r in reports]
        stages.append({"stage": name} | {m: _spread([float(row[m]) for row in rows]) for m in METRICS if all(row.get(m) is not None for row in rows)})
    return {
        "heldout": reports[0]["heldout"],
        "stages": stages,
        "selected": {str(seed): r["selection"]["stage"] for seed, r in zip(seeds, reports, strict=True)},
        "reasons": {str(seed): r["selection"]["reason"] for seed, r in zip(seeds, reports, strict=True)},
    }


def _interval(d: dict[str, Any], scale: float, fmt: str) -> str:
    """"mean ± half-width" (or the mean alone for one seed)."""
    text = format(scale * d["mean"], fmt)
    return text if d["ci95"] is None else f"{text} ± {format(scale * d['ci95'], fmt.lstrip('+'))}"


def results_table(results: dict[str, Any]) -> Group:
    """The comparison (means ± 95% CI), where the teacher erred, the paired effects, and what the
    caches say: short tables that fit an 80-column terminal."""
    from rich.console import Group
    from rich.table import Table

    n = len(results["seeds"])
    over = f"mean ± 95% CI over {n} seed{'s' * (n > 1)}"
    t = Table(title=f"Held-out results ({results['heldout_prompts']} prompts; {over})", title_justify="left")
    for col in ("student", "exact match", "NLL/token", "top-1"):
        t.add_column(col, justify="left" if col == "student" else "right")
    for v in results["variants"]:
        em, nll, agree = (v[m] for m in METRICS)
        t.add_row(
            v["label"], _interval(em, 100, ".1f") + "%", _interval(nll, 1, ".3f"), _interval(agree, 100, ".1f") + "%",
            style="bold" if v["key"] == "proxy_kd" else None,
        )  # fmt: skip
    teacher, proxy = results["teacher"], results["proxy"]
    before, after = proxy["before_alignment"], proxy["after_alignment"]
    t.caption = (
        f"NLL/token and top-1: of the teacher's responses. Teacher exact match {100 * teacher['exact_match']:.1f}% "
        f"(against the correct answers); proxy top-1 agreement with the teacher {100 * before['top1_agreement']:.1f}% "
        f"before alignment, {100 * after['top1_agreement']:.1f}% after (proxy exact match "
        f"{100 * before['exact_match']:.1f}% → {100 * after['exact_match']:.1f}%)"
    )
    if "cache_bytes_per_token" in results:
        c = results["cache_bytes_per_token"]
        t.caption += f"; cache bytes/token: top-20 {c['aligned']:.1f}, sampled {c['sampled']:.1f} ({c['sampled'] / c['aligned']:.2f}×)"
    parts: list[Any] = [t]
    split = [v for v in results["variants"] if "em_teacher_wrong" in v]
    if split:
        w = Table(title=f"Exact match where the teacher was right / wrong ({over})", title_justify="left")
        for col in ("student", "teacher right", "teacher wrong", "repeats its error"):
            w.add_column(col, justify="left" if col == "student" else "right")
        for v in split:
            w.add_row(v["label"], *(_interval(v[m], 100, ".1f") + "%" if m in v else "–" for m in SPLIT_METRICS))
        parts.append(w)
    e = Table(title=f"Paired effects (a − b per seed; {over})", title_justify="left")
    for col in ("effect", "exact match", "NLL/token", "sign", "EM, t. wrong"):
        e.add_column(col, justify="left" if col == "effect" else "right")
    for eff in results["paired_effects"]:
        em, nll = eff["exact_match"], eff["nll_per_token"]
        wrong = _interval(eff["em_teacher_wrong"], 100, "+.1f") if "em_teacher_wrong" in eff else "–"
        e.add_row(eff["label"], _interval(em, 100, "+.1f"), _interval(nll, 1, "+.3f"), f"{_sign(em['sign'])}/{_sign(nll['sign'])}", wrong)
    e.caption = "exact match in points; sign: of exact match / NLL, n.s. where the interval covers 0; EM, t. wrong: on prompts the teacher got wrong"
    parts.append(e)
    if "alignment" in results["proxy"]:
        parts.append(_alignment_table(results["proxy"]["alignment"], over))
    diag = {name: d for name, d in (results.get("diagnostics") or {}).items() if name in ("aligned", "unaligned")}
    if diag:
        parts.append(_diagnostics_table(diag, len(results["seeds"])))
    return Group(*parts)


def _alignment_table(alignment: dict[str, Any], over: str) -> Any:
    """The proxy after each proxy-align stage, on its own held-out slice of D_s."""
    from collections import Counter

    from rich.table import Table

    held = alignment["heldout"]
    t = Table(title=f"The proxy per alignment stage ({held['samples']} held-out D_s samples; {over})", title_justify="left")
    for col in ("stage", "exact match", "NLL/token", "top-1", "selected"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    picked = Counter(alignment["selected"].values())
    for st in alignment["stages"]:
        em = _interval(st["exact_match"], 100, ".1f") + "%" if "exact_match" in st else "–"
        t.add_row(st["stage"], em, _interval(st["nll_per_token"], 1, ".3f"), _interval(st["top1_agreement"], 100, ".1f") + "%", str(picked.get(st["stage"], "")))
    t.caption = f"selected: how many alignments kept that stage as their output (--select best, answer: {held.get('answer', '?')})"
    return t


def _auc(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _sign(sign: int) -> str:
    return {1: "+", -1: "−", 0: "n.s."}[sign]


def _diagnostics_table(diag: dict[str, Any], seeds: int) -> Any:
    """Per cache (aligned proxy: the mean over its seeds; unaligned proxy), one column each: the
    AUC of ℓ for right vs wrong teacher responses, the weights each group got, and top-1
    agreement with the teacher per position class."""
    from rich.table import Table

    over = f"; aligned: mean over {seeds} alignments" if seeds > 1 else ""
    t = Table(title=f"What the logit caches say (distillation set D_s{over})", title_justify="left")
    t.add_column("")
    for name in diag:
        t.add_column(f"{name} proxy", justify="right")

    def pct(d: dict[str, Any], cls: str, key: str = "agreement") -> str:
        agree = d["agreement"]
        return f"{100 * agree[cls][key]:.1f}%" if cls in agree and key in agree[cls] else "–"

    def weights(d: dict[str, Any]) -> str:
        sep = d["weights"]
        return "–" if sep["mean_weight_wrong"] is None else f"{sep['mean_weight_right']:.3f} / {sep['mean_weight_wrong']:.3f}"

    rows = (
        ("teacher responses wrong", lambda d: f"{100 * d['weights']['teacher_wrong_share']:.1f}%"),
        ("AUC of ℓ, right vs wrong", lambda d: _auc(d["weights"]["auc_ell_right_vs_wrong"])),
        ("AUC of the min token logprob", lambda d: _auc(d["weights"].get("auc_min_token_logprob"))),
        ("mean w, right / wrong", weights),
        ("top-1 agreement: all tokens", lambda d: pct(d, "all")),
        ("  answer digits", lambda d: pct(d, "answer")),
        ("  digits computed after '='", lambda d: pct(d, "computed")),
        ("  where the teacher slipped", lambda d: pct(d, "computed_teacher_slipped")),
        ("proxy's top-1 true at slips", lambda d: pct(d, "computed_teacher_slipped", "proxy_says_true")),
    )
    for label, cell in rows:
        t.add_row(label, *(cell(d) for d in diag.values()))
    return t


def write_chart(results: dict[str, Any], path: Path) -> bool:
    """What a reader looks for: exact match per variant (95% CI, teacher line); the paired effects
    on exact match and NLL (a − b per seed, 95% CI, zero line); and the proxy before and after
    alignment, its agreement with the teacher beside its own exact match. False (nothing drawn)
    without matplotlib, the `plots` extra."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    labels = [v["label"].replace(", ", ",\n").replace(" (", "\n(") for v in variants]
    colors = plt.get_cmap("tab10").colors
    fig, (em_ax, eff_em, eff_nll, proxy_ax) = plt.subplots(1, 4, figsize=(22, 5.5), gridspec_kw={"width_ratios": [3, 2.2, 2.2, 1.4]})
    means = [100 * v["exact_match"]["mean"] for v in variants]
    cis = [100 * (v["exact_match"]["ci95"] or 0.0) for v in variants]
    bars = em_ax.bar(range(len(variants)), means, yerr=cis, capsize=4, color=colors[: len(variants)])
    em_ax.set_xticks(range(len(variants)), labels, fontsize=7)
    em_ax.bar_label(bars, fmt="%.1f", fontsize=8, label_type="center")
    em_ax.axhline(100 * results["teacher"]["exact_match"], color="black", linestyle="--", linewidth=1, label="teacher")
    em_ax.set_title("exact match on held-out prompts (%)")
    em_ax.legend(loc="upper left")
    effects = results["paired_effects"]
    names = [e["label"].replace(" (", "\n(") for e in effects]
    for ax, metric, scale, title in ((eff_em, "exact_match", 100, "paired effect on exact match (points)"), (eff_nll, "nll_per_token", 1, "paired effect on NLL / token")):
        vals = [scale * e[metric]["mean"] for e in effects]
        errs = [scale * (e[metric]["ci95"] or 0.0) for e in effects]
        shades = ["tab:gray" if e[metric]["sign"] == 0 else ("tab:green" if (e[metric]["sign"] > 0) == (metric == "exact_match") else "tab:red") for e in effects]
        ax.barh(range(len(effects)), vals, xerr=errs, capsize=3, color=shades)
        ax.axvline(0, color="black", linewidth=1)
        ax.set_yticks(range(len(effects)), names if ax is eff_em else [""] * len(effects), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title)
    eff_em.text(0.01, -0.12, "a − b per seed, mean ± 95% CI; green: better, red: worse, grey: n.s.", transform=eff_em.transAxes, fontsize=7)
    proxy = results["proxy"]
    before, after = proxy["before_alignment"], proxy["after_alignment"]
    x = [0, 1]
    proxy_ax.bar([i - 0.2 for i in x], [100 * before["top1_agreement"], 100 * after["top1_agreement"]], width=0.4, color="tab:purple", label="top-1 agreement with the teacher")
    proxy_ax.bar([i + 0.2 for i in x], [100 * before["exact_match"], 100 * after["exact_match"]], width=0.4, color="tab:orange", label="its own exact match")
    proxy_ax.axhline(100 * results["teacher"]["exact_match"], color="black", linestyle="--", linewidth=1, label="teacher's exact match")
    proxy_ax.set_xticks(x, ["before", "after alignment"])
    proxy_ax.set_ylim(0, 105)
    proxy_ax.set_title("the proxy (%)")
    proxy_ax.legend(loc="lower left", fontsize=7)
    n = len(results["seeds"])
    fig.suptitle(f"pkd demo ({results['mode']}): mean ± 95% CI over {n} seed{'s' * (n > 1)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
