"""`pkd demo`: the comparison it reports, how a failed step surfaces, and (slow) the quick demo
end to end — the smoke test CI runs: four real `pkd` commands against a real vLLM teacher."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from pkd.toy.demo import DemoError, DemoPaths, _Steps
from pkd.toy.variants import VARIANTS
from pkd.toy.results import alignment_stages, results_table, summarize, write_chart
from pkd.toy.world import ToyWorld

REPO = Path(__file__).resolve().parent.parent


def _report(em: float, nll: float, agree: float) -> dict[str, float | int]:
    return {"exact_match": em, "nll_per_token": nll, "top1_agreement": agree, "rows": 4}


def _scores() -> dict[str, dict[str, dict]]:
    scores = {
        "teacher": {"all": _report(1.0, 0.1, 0.99)},
        "proxy_before": {"all": _report(0.5, 1.0, 0.6)},
        "proxy_after": {"all": _report(0.9, 0.2, 0.95)},
        "student_base": {"all": _report(0.05, 3.0, 0.4)},
    }
    for i, v in enumerate(VARIANTS[1:]):
        scores[v.key] = {
            str(s): _report(0.5 + 0.1 * i + 0.02 * s, 0.5 - 0.05 * i, 0.9)
            | {"em_teacher_right": 0.6, "em_teacher_wrong": 0.1 * i, "repeats_teacher_error": 0.5}
            for s in (0, 1, 2)
        }
    return scores


def test_summary_pairs_variants_seed_by_seed_with_t_intervals(tmp_path: Path) -> None:
    world = ToyWorld.at(tmp_path, {"prompts": {"heldout": 4, "train": 8}})
    diag = {
        "aligned": {
            "weights": {"teacher_wrong_share": 0.25, "auc_ell_right_vs_wrong": 0.61, "auc_min_token_logprob": 0.7, "mean_weight_right": 0.52, "mean_weight_wrong": 0.44},
            "agreement": {"all": {"agreement": 0.9, "tokens": 9}, "computed_teacher_slipped": {"agreement": 0.125, "tokens": 8, "proxy_says_true": 0.75}},
        }
    }  # fmt: skip
    results = summarize(_scores(), world, [0, 1, 2], quick=False, timings={"total": 1.0}, commands=["pkd x"], diagnostics=diag)
    by_key = {v["key"]: v for v in results["variants"]}
    assert list(by_key) == [v.key for v in VARIANTS]
    pkd = by_key["proxy_kd"]["exact_match"]
    assert pkd["values"] == pytest.approx([0.8, 0.82, 0.84])
    assert pkd["mean"] == pytest.approx(0.82) and pkd["std"] == pytest.approx(0.02)
    assert pkd["ci95"] == pytest.approx(4.303 * 0.02 / 3**0.5)  # t_{0.975, 2} · s / √n
    assert by_key["student_base"]["exact_match"]["ci95"] is None  # one value: no interval
    effects = {e["label"]: e for e in results["paired_effects"]}
    gain = effects["Proxy-KD − black-box KD"]["exact_match"]
    # Per seed the difference is exactly 0.3: no spread, so the interval is 0 wide and excludes 0.
    assert gain["values"] == pytest.approx([0.3] * 3) and gain["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert gain["sign"] == 1 and gain["seeds"] == ["0", "1", "2"]
    assert effects["sample weights (Proxy-KD − uniform weights)"]["nll_per_token"]["mean"] == pytest.approx(-0.05)
    assert effects["alignment (Proxy-KD − unaligned proxy)"]["em_teacher_wrong"]["mean"] == pytest.approx(0.2)
    assert "em_teacher_wrong" not in by_key["student_base"]  # not scored for the base: no column
    assert results["proxy"]["before_alignment"]["top1_agreement"] == 0.6
    json.dumps(results)  # what results.json holds

    console = Console(record=True, width=240)
    console.print(results_table(results))
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    for v in VARIANTS:
        assert v.label in text
    assert "82.0 ± 5.0%" in text and "+30.0 ± 0.0" in text and "60.0% before alignment, 95.0% after" in text
    assert "repeats its error" in text and "+20.0 ± 0.0" in text
    assert all(cell in text for cell in ("0.610", "0.700", "0.520 / 0.440", "12.5%", "75.0%"))

    write_chart(results, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_proxy_per_alignment_stage_is_summarised_over_seeds(tmp_path: Path) -> None:
    def report(seed: int) -> dict:
        stage = lambda name, em, nll: {"stage": name, "exact_match": em, "nll_per_token": nll, "top1_agreement": 0.9}  # noqa: E731
        return {
            "heldout": {"samples": 200, "answer": "the last match"},
            "stages": [stage("base", 1.0, 2.0), stage("warmup", 0.9 + 0.02 * seed, 0.3), stage("round-01", 0.5, 0.2)],
            "selection": {"stage": "warmup", "reason": f"seed {seed}"},
        }

    alignment = alignment_stages([report(0), report(1), report(2)], [0, 1, 2])
    assert [st["stage"] for st in alignment["stages"]] == ["base", "warmup", "round-01"]
    assert alignment["stages"][1]["exact_match"]["mean"] == pytest.approx(0.92)
    assert alignment["selected"] == {"0": "warmup", "1": "warmup", "2": "warmup"}
    results = summarize(_scores(), ToyWorld.at(tmp_path, {"prompts": {"heldout": 4, "train": 8}}), [0, 1, 2], quick=False, timings={}, commands=[])
    results["proxy"]["alignment"] = alignment
    console = Console(record=True, width=240)
    console.print(results_table(results))
    text = " ".join(console.export_text().split())
    assert "The proxy per alignment stage (200 held-out D_s samples" in text and "92.0 ± 5.0%" in text


def test_unpaired_seeds_are_refused(tmp_path: Path) -> None:
    scores = _scores()
    del scores["no_weights"]["2"]
    with pytest.raises(ValueError, match="unpaired seeds"):
        summarize(scores, ToyWorld.at(tmp_path, {"prompts": {"heldout": 4}}), [0, 1, 2], quick=False, timings={}, commands=[])


def test_the_toy_recipe_checks_answers_as_the_task_family_states_them() -> None:
    from pkd.config import load_recipe
    from pkd.toy.tasks import ANSWER_RE

    assert load_recipe().eval.answer_pattern == ANSWER_RE.pattern


def test_a_failed_step_stops_the_demo_naming_the_command(tmp_path: Path) -> None:
    paths = DemoPaths(tmp_path)
    world = ToyWorld.at(paths.world, {})
    steps = _Steps(paths, world, quick=True, say=lambda _line: None)
    with pytest.raises(DemoError, match=r"exit 2\): pkd teacher-sample --prompts .*missing\.jsonl"):
        steps.pkd("teacher-sample", "--prompts", tmp_path / "missing.jsonl", "--dry-run")
    assert steps.commands == [f"pkd teacher-sample --prompts {tmp_path / 'missing.jsonl'} --dry-run"]


@pytest.mark.slow
def test_quick_demo_runs_the_pipeline_end_to_end(toy_world_quick: ToyWorld) -> None:
    root = toy_world_quick.root.parent
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "pkd.cli", "demo", "--quick", "--root", str(root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Held-out results" in done.stdout and "teacher server stopped" in done.stdout
    assert "it/s]" not in done.stdout + done.stderr  # libraries' progress bars went to the steps' logs

    paths = DemoPaths(root)
    results = json.loads(paths.results.read_text())
    assert paths.chart.read_bytes()[:4] == b"\x89PNG"
    assert [v["key"] for v in results["variants"]] == [v.key for v in VARIANTS]
    for v in results["variants"]:
        for metric in ("exact_match", "nll_per_token", "top1_agreement"):
            assert math.isfinite(v[metric]["mean"]) and len(v[metric]["values"]) == 1
        if v["key"] != "student_base":
            assert 0 <= v["em_teacher_wrong"]["mean"] <= 1 and 0 <= v["repeats_teacher_error"]["mean"] <= 1
    # The teacher errs on some held-out prompts; the caches say how ℓ ranks its wrong responses.
    diag = results["diagnostics"]["aligned"]
    assert 0 < diag["weights"]["teacher_wrong_share"] < 1 and 0 <= diag["weights"]["auc_ell_right_vs_wrong"] <= 1
    assert diag["agreement"]["all"]["tokens"] > diag["agreement"]["computed"]["tokens"] > 0
    # Distillation moved every trained student towards the teacher.
    base_nll = results["variants"][0]["nll_per_token"]["mean"]
    assert all(v["nll_per_token"]["mean"] < base_nll for v in results["variants"][1:])
    assert results["teacher"]["exact_match"] >= 0.5  # a flawed teacher: ~75% right
    proxy = results["proxy"]
    assert proxy["after_alignment"]["top1_agreement"] > proxy["before_alignment"]["top1_agreement"]
    # The four real commands ran, and every artifact they wrote is complete.
    steps = [c.split()[1] for c in results["commands"]]
    assert steps[:6] == ["teacher-sample", "teacher-sample", "proxy-align", "cache-logits", "cache-logits", "cache-logits"]
    assert steps[6:] == ["train-student"] * (len(VARIANTS) - 1)  # every variant but the untrained base
    for name in ("teacher", "teacher-heldout", "proxy", "logits", "logits-unaligned", "logits-sampled"):
        assert json.loads((paths.artifact(name) / "manifest.json").read_text())["complete"], name
    for name in ("logits", "logits-sampled"):
        verify = subprocess.run([sys.executable, "-m", "pkd.cli", "cache", "verify", str(paths.artifact(name))], cwd=REPO, capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    assert 0 < results["cache_bytes_per_token"]["sampled"] < results["cache_bytes_per_token"]["aligned"]
    # The teacher server the demo started is gone.
    assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).count(str(toy_world_quick.teacher))]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_sampled_cache_is_compared_with_top20_paired_over_seeds(tmp_path: Path) -> None:
    from pkd.toy.results import EFFECTS

    scores = _scores()
    labels = [label for a, b, label in EFFECTS if (a, b) == ("sampled_cache", "proxy_kd")]
    assert labels, "the sampled cache's paired effect is not reported"
    seeds = sorted(k for k in scores["proxy_kd"] if k != "all")
    results = summarize(scores, ToyWorld.at(tmp_path, {"prompts": {"heldout": 4}}), [int(s) for s in seeds], quick=False, timings={}, commands=[])
    d = next(e for e in results["paired_effects"] if e["label"] == labels[0])["nll_per_token"]
    want = [scores["sampled_cache"][s]["nll_per_token"] - scores["proxy_kd"][s]["nll_per_token"] for s in seeds]
    assert d["mean"] == pytest.approx(sum(want) / len(want)) and d["seeds"] == seeds


def test_results_tables_fit_80_columns(tmp_path: Path) -> None:
    """Every table the demo prints (results, paired effects, cache diagnostics) fits a standard
    terminal without cutting a header or a cell."""
    import io

    diag = {
        name: {
            "weights": {"teacher_wrong_share": 0.409, "auc_ell_right_vs_wrong": 0.522, "auc_min_token_logprob": 0.7, "mean_weight_right": 0.523, "mean_weight_wrong": 0.502},
            "agreement": {"all": {"agreement": 0.894, "tokens": 9}, "answer": {"agreement": 0.998, "tokens": 9}, "computed": {"agreement": 0.801, "tokens": 9}, "computed_teacher_slipped": {"agreement": 0.125, "tokens": 8, "proxy_says_true": 0.857}},
        }
        for name in ("aligned", "unaligned")
    }  # fmt: skip
    results = summarize(_scores(), ToyWorld.at(tmp_path, {"prompts": {"heldout": 400}}), [0, 1, 2], quick=False, timings={}, commands=[], diagnostics=diag)
    results["cache_bytes_per_token"] = {"aligned": 30.5, "unaligned": 30.1, "sampled": 14.5}
    buf = io.StringIO()
    Console(file=buf, width=80, force_terminal=False, color_system=None).print(results_table(results))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert not [line for line in lines if "…" in line], "a header or cell was cut"
