"""The trained student's model card (`README.md` in the train-student folder, and on the Hub with
`pkd push-model`): what it was distilled from and how, so a reader of the repository can judge
and reproduce it.

Everything comes from the folder itself: `report.json` (the settings, the cache's lineage, the
command, the final losses) and, when given, `pkd eval` reports (teacher-sample figures and
lm-eval scores).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pkd.hub import license_lines

CARD = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_card(report: dict[str, Any], evals: list[dict[str, Any]] | None = None, *, license: str | None = None) -> str:
    """README.md text for a student folder from its `report.json` and `pkd eval` reports."""
    cfg, cache = report.get("config", {}), report.get("cache", {})
    base = report.get("student") or "-"
    lora = bool(cfg.get("lora"))
    header = ["---", *license_lines(license)]
    if _HUB_ID.match(base) and not Path(base).exists():  # the Hub links a base model by its id only
        header += [f"base_model: {base}"]
    header += [f"library_name: {'peft' if lora else 'transformers'}", "pipeline_tag: text-generation", "tags:", "- pkd", "- knowledge-distillation", "- proxy-kd", "---"]
    loss = [
        ("α (KD strength)", cfg.get("alpha")), ("tail", cfg.get("tail")), ("KD temperature", cfg.get("temperature")),
        ("sample weights", "uniform (the cache's mean w)" if cfg.get("uniform_weights") else "proxy, w = σ((ℓ − μ)/γ)"),
        ("CE weighted by w", cfg.get("weight_ce")), ("weights", f"LoRA r={cfg.get('lora_r')}" if lora else "all (full fine-tuning)"),
        ("steps / tokens", f"{report.get('steps', 0):,} / {report.get('tokens', 0):,}"),
        ("learning rate", cfg.get("learning_rate")), ("seed", cfg.get("seed")),
    ]  # fmt: skip
    lineage = [
        ("teacher", cache.get("teacher") or "-"), ("proxy fingerprint", f"`{cache.get('proxy', '-')}`"),
        ("logit cache", f"{cache.get('rows', 0):,} samples, {cache.get('tokens', 0):,} tokens, top-{cache.get('k')}"),
        ("cache fingerprint", f"`{report.get('inputs', {}).get('cache', '-')}`"),
    ]  # fmt: skip
    final = ", ".join(f"{k} {v:.4f}" for k, v in report.get("final", {}).items()) or "-"
    lines = [
        *header,
        "",
        f"# {Path(base).name if base != '-' else 'Student'} distilled with Proxy-KD",
        "",
        f"A student distilled from a black-box teacher ({cache.get('teacher') or '-'}) through an aligned open proxy with",
        "[pkd](https://arxiv.org/abs/2401.07013): cross-entropy on the teacher's responses plus a KL term to the",
        "proxy's cached top-k distributions, per sample weighted by how likely the proxy finds the response.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {base} |",
        *[f"| {k} | {v} |" for k, v in lineage],
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in loss],
        f"| final losses | {final} |",
        "",
    ]
    for e in evals or []:
        lines += _eval_section(e)
    if command := report.get("command"):
        lines += ["## How it was made", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def _eval_section(e: dict[str, Any]) -> list[str]:
    """A `pkd eval` report: teacher-sample figures and lm-eval scores (no stderr row for metrics
    that have none)."""
    lines = [f"## Evaluation ({e.get('samples', 'benchmarks')}{', ' + e['split'] if e.get('split') else ''})", ""]
    figures = [("NLL / token", e.get("nll_per_token")), ("top-1 agreement with the teacher", e.get("top1_agreement")), ("exact match", e.get("exact_match"))]
    if any(v is not None for _, v in figures):
        lines += ["| measure | value |", "| --- | --- |", *[f"| {k} | {v:.4f} |" for k, v in figures if v is not None], ""]
    if bench := e.get("benchmarks"):
        lines += [f"lm-eval {bench.get('lm_eval_version')}:", "", "| task | metric | value | ± stderr |", "| --- | --- | --- | --- |"]
        for task, metrics in bench.get("tasks", {}).items():
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key:  # metric,filter pairs only (not lm-eval's sample_len count)
                    continue
                stderr = metrics.get(key.replace(",", "_stderr,", 1))
                lines.append(f"| {task} | {key.split(',')[0]} | {value:.4f} | {'-' if stderr is None else f'{stderr:.4f}'} |")
        lines.append("")
    return lines


def write_card(folder: Path, evals: list[dict[str, Any]] | None = None, *, license: str | None = None) -> Path:
    """(Re)write `folder/README.md` from `folder/report.json`."""
    report = json.loads((folder / "report.json").read_text())
    path = folder / CARD
    path.write_text(model_card(report, evals, license=license), encoding="utf-8")
    return path
