"""`pkd demo`: the whole Proxy-KD pipeline on the toy world, and the paper's comparison.

The demo builds (once, cached) the toy world of `pkd.toy.world`, serves its teacher as a black
box with a real vLLM OpenAI-compatible server on 127.0.0.1, and runs the four pipeline commands
as a user would — each one a `pkd ...` child process, printed before it runs:

    pkd teacher-sample   train prompts -> run/teacher, held-out prompts -> run/teacher-heldout
    pkd proxy-align      world proxy + run/teacher -> R/proxy, once per seed
    pkd cache-logits     the world proxy without an adapter -> run/logits-unaligned (the
                         ablation); per seed, its aligned proxy -> R/logits (top-20) and
                         R/logits-sampled (N = 12 draws)
    pkd train-student    one student per variant and seed -> run/students/VARIANT-seedS

(R: the seed's replicate folder, run/ for seed 0 and run/seedS/ otherwise; see below), then
scores every student (and the proxy before and after alignment) on the held-out teacher samples
with `pkd.steps.evaluate`, reads what the caches say about the proxy (`pkd.toy.diagnose`), and
writes `results.json` and `results.png` beside `run/`.

A seed is one replicate of everything downstream of the teacher: the proxy's alignment (its
adapter's initialisation and its own samples), the sampled cache's draws, and the students'
initialisation and data order. The teacher samples are shared: they are what a user pays for
once. Two runs with one alignment each disagreed on the weights' effect (the AUC of ℓ was 0.85
in one and 0.76 in the other), so the intervals must cover the alignment's variance, not only
the students'. Within a seed every variant reads the same samples in the same order (checked),
so variants are compared seed by seed (paired). Seed 0's alignment and caches live at the toy
recipe's default paths (run/proxy, run/logits, run/logits-sampled), so every step reruns by
hand with no flags; other seeds' under run/seedS/.

Later runs reuse the world and rerun the pipeline from scratch; `resume=True` keeps `run/` and
lets every step resume or skip what it already finished (each step's own resumability).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkd.console import step_console, terminal
from pkd.errors import PkdError
from pkd.toy.results import alignment_stages, summarize, write_chart
from pkd.toy.stats import mean_of
from pkd.toy.variants import CACHE_DIRS, SAMPLES, VARIANTS, Variant
from pkd.toy.world import ToyWorld, build_world

DEFAULT_ROOT = Path("cache") / "demo"
FULL_SEEDS = (0, 1, 2, 3, 4)
QUICK_SEEDS = (0,)


class DemoError(PkdError):
    """A pipeline step of the demo failed; its own error is printed above or in the log named."""


@dataclass(frozen=True)
class DemoPaths:
    """Where one demo (full or quick) keeps its world, its pipeline artifacts and results."""

    root: Path

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def artifact(self, name: str) -> Path:
        return self.run / name

    def replicate(self, seed: int) -> Path:
        """Seed `seed`'s aligned proxy and caches: run/ for seed 0 (the toy recipe's default
        paths), run/seedS/ otherwise."""
        return self.run if seed == 0 else self.run / f"seed{seed}"

    def proxy(self, seed: int) -> Path:
        return self.replicate(seed) / "proxy"

    def cache(self, kind: str, seed: int) -> Path:
        """The cache a variant of kind `kind` (see pkd.toy.variants.CACHE_DIRS) reads under
        `seed`; the unaligned proxy's is one for all seeds (no alignment, nothing seeded)."""
        return self.run / CACHE_DIRS[kind] if kind == "unaligned" else self.replicate(seed) / CACHE_DIRS[kind]

    def student(self, variant: str, seed: int) -> Path:
        return self.run / "students" / f"{variant}-seed{seed}"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def chart(self) -> Path:
        return self.root / "results.png"


def run_demo(
    root: str | Path | None = None,
    *,
    quick: bool = False,
    seeds: Sequence[int] | None = None,
    resume: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build or find the world, run the pipeline, evaluate, write and return the results."""
    paths = DemoPaths(Path(root) if root else DEFAULT_ROOT / ("quick" if quick else "full"))
    seeds = tuple(seeds) if seeds else (QUICK_SEEDS if quick else FULL_SEEDS)
    timings: dict[str, float] = {}
    start = time.monotonic()

    # transformers' save/load progress bars go to world.log beside the world; the phases to the terminal
    with _timer(timings, "world"), step_console("world", str(paths.world)):  # 2 threads: more only spin on models this small
        world = build_world(paths.world, quick=quick, threads=min(2, os.cpu_count() or 1), log=lambda line: terminal().print(line, markup=False, highlight=False), progress=True)
    say(f"toy world at {paths.world}: teacher held-out accuracy {world.report['teacher_heldout_accuracy']:.1%}")
    if not resume:
        shutil.rmtree(paths.run, ignore_errors=True)
    paths.run.mkdir(parents=True, exist_ok=True)
    steps = _Steps(paths, world, quick, say)

    with _timer(timings, "teacher_sample"):
        steps.teacher_sample()
    with _timer(timings, "proxy_align"):
        steps.proxy_align(seeds)
    with _timer(timings, "cache_logits"):
        steps.cache_logits(seeds)
    diagnostics = _diagnose(paths, world, seeds)
    with _timer(timings, "train_student"):
        steps.train_students([(v, seed) for seed in seeds for v in VARIANTS if v.cache])
    with _timer(timings, "eval"):
        scores = _evaluate_all(paths, world, seeds, say)
    timings["total"] = round(time.monotonic() - start, 1)

    results = summarize(scores, world, seeds, quick=quick, timings=timings, commands=steps.commands, diagnostics=diagnostics)
    results["proxy"]["alignment"] = alignment_stages([json.loads((paths.proxy(s) / "report.json").read_text()) for s in seeds], seeds)
    results["cache_bytes_per_token"] = {kind: statistics.fmean(_bytes_per_token(c) for c in {paths.cache(kind, s) for s in seeds}) for kind in CACHE_DIRS}
    results["files"] = {"results": str(paths.results), "run": str(paths.run)}
    if write_chart(results, paths.chart):  # without matplotlib (the `plots` extra) there is no chart
        results["files"]["chart"] = str(paths.chart)
    write_results(results, paths.results)
    return results


def write_results(results: dict[str, Any], path: Path) -> None:
    """results.json, written whole or not at all (renamed into place)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    """Wall seconds of one demo phase into `timings[name]`."""
    start = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - start, 1)


class CommandRunner:
    """Runs `pkd` commands as child processes and records each as a user would type it; both
    demos (toy and real, pkd.toy.real) drive the pipeline through one, so what they print and
    record are commands a user can rerun by hand."""

    def __init__(self, paths: DemoPaths, quick: bool, say: Callable[[str], None]) -> None:
        self.paths, self.quick, self.say = paths, quick, say
        self.commands: list[str] = []

    def pkd(self, *args: str | Path) -> None:
        """Run one command with the terminal attached (its progress bars show)."""
        argv, shown = self._show(args)
        done = subprocess.run(argv, check=False)
        if done.returncode != 0:
            raise DemoError(f"demo step failed (exit {done.returncode}): {shown}")

    def pkd_concurrently(self, commands: list[tuple[str, list[str | Path]]]) -> None:
        """Run commands side by side in two `pkd batch` processes, one CPU thread each, each
        command's output to `logs/NAME.log`, and print each one's summary line as it finishes.
        The toy models are too small to use a second thread well (~1.5x per step on 2 cores), so
        two at a time on 2 cores finish ~1.5x sooner; and a batch process imports
        torch/transformers once instead of once a command (~7 s each). Every command still gives
        what it gives run alone (tests/test_demo.py checks a student's weights)."""
        slots = max(1, min(len(commands), os.cpu_count() or 1))
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // slots)), "COLUMNS": "200"}
        logs = self.paths.run / "logs"
        logs.mkdir(exist_ok=True)
        todo: queue.SimpleQueue[tuple[str, list[str | Path]]] = queue.SimpleQueue()
        for command in commands:
            todo.put(command)
        failed = threading.Event()

        def worker() -> None:
            with subprocess.Popen(
                [sys.executable, "-m", "pkd.cli", "batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1
            ) as proc:  # fmt: skip
                assert proc.stdin is not None and proc.stdout is not None
                try:
                    while not failed.is_set():
                        try:
                            name, args = todo.get_nowait()
                        except queue.Empty:
                            break
                        argv, shown = self._show(args)
                        log = logs / f"{name}.log"
                        proc.stdin.write(json.dumps({"argv": argv[3:], "log": str(log)}) + "\n")
                        reply = proc.stdout.readline()
                        code = json.loads(reply)["exit_code"] if reply else proc.wait()
                        if code != 0:
                            failed.set()
                            raise DemoError(f"demo step failed (exit {code}; its log: {log}): {shown}")
                        lines = log.read_text(errors="replace").strip().splitlines()
                        self.say(f"  {lines[-1] if lines else 'done'}")
                finally:
                    proc.stdin.close()

        with ThreadPoolExecutor(slots) as pool:
            for future in [pool.submit(worker) for _ in range(slots)]:
                future.result()

    def _show(self, args: tuple[str | Path, ...] | list[str | Path]) -> tuple[list[str], str]:
        """The child's argv, and the command as a user would type it (printed and recorded)."""
        argv = [str(a) for a in args]
        shown = "pkd " + shlex.join(argv)
        self.commands.append(shown)
        self.say(f"\n$ {shown}")
        return [sys.executable, "-m", "pkd.cli", *argv], shown

    def _quick(self, *flags: str) -> tuple[str, ...]:
        """Flags that make quick mode quick (fewer rounds, epochs, prompts): `flags` in quick
        mode, nothing otherwise."""
        return flags if self.quick else ()


class _Steps(CommandRunner):
    """The toy world's four pipeline commands. Settings come from the embedded toy recipe
    (recipes/toy.toml); the demo adds only paths, the ablation flags, and in quick mode the
    `_quick` flags (the HF engine instead of a vLLM start per use, ~15 s each on CPU; fewer
    rounds and epochs; the teacher stays behind vLLM)."""

    def __init__(self, paths: DemoPaths, world: ToyWorld, quick: bool, say: Callable[[str], None]) -> None:
        super().__init__(paths, quick, say)
        self.world = world

    def teacher_sample(self) -> None:
        from pkd.engines.serve import vllm_server

        log = self.paths.run / "teacher-server.log"
        self.say(f"\nstarting the teacher: a vLLM OpenAI-compatible server on 127.0.0.1 (log: {log})")
        with vllm_server(self.world.teacher, served_model_name="teacher", dtype="float32", log_path=log) as server:
            for prompts, out in ((self.world.prompts_train, "teacher"), (self.world.prompts_heldout, "teacher-heldout")):
                self.pkd(
                    "teacher-sample", "--prompts", prompts, "--out", self.paths.artifact(out),
                    "--base-url", server.base_url, "--model", "teacher",
                )  # fmt: skip
        self.say("teacher server stopped")

    def proxy_align(self, seeds: Sequence[int]) -> None:
        """One alignment per seed, two at a time (each on one thread)."""
        self.pkd_concurrently([
            (f"proxy-align-seed{seed}", [
                "proxy-align", "--model", self.world.proxy, "--student", self.world.student,
                "--teacher", self.paths.artifact("teacher"), "--out", self.paths.proxy(seed), "--seed", str(seed),
                *self._quick("--rounds", "2"),
            ]) for seed in seeds
        ])  # fmt: skip

    def cache_logits(self, seeds: Sequence[int]) -> None:
        """The unaligned proxy's top-20 once, then each seed's aligned top-20 and sampled caches;
        the sampled draws are seeded by the run seed (`--set run.seed=S`)."""

        def common(seed: int) -> list[str | Path]:
            return [
                "--proxy", self.paths.proxy(seed), "--teacher", self.paths.artifact("teacher"),
                "--student", self.world.student, *self._quick("--engine", "hf"),
            ]  # fmt: skip

        first = seeds[0]
        commands: list[tuple[str, list[str | Path]]] = [
            ("cache-logits-unaligned", ["cache-logits", *common(first), "--no-adapter", "--out", self.paths.cache("unaligned", first)])
        ]
        for seed in seeds:
            commands += [
                (f"cache-logits-aligned-seed{seed}", ["cache-logits", *common(seed), "--out", self.paths.cache("aligned", seed)]),
                (f"cache-logits-sampled-seed{seed}", [
                    "cache-logits", *common(seed), "--sampled", str(SAMPLES), "--set", f"run.seed={seed}",
                    "--out", self.paths.cache("sampled", seed),
                ]),
            ]  # fmt: skip
        self.pkd_concurrently(commands)

    def train_students(self, runs: list[tuple[Variant, int]]) -> None:
        commands = []
        for v, seed in runs:
            cache = self.paths.cache(v.cache, seed)
            args = [
                "train-student", "--cache", cache, "--student", self.world.student,
                "--out", self.paths.student(v.key, seed), "--seed", str(seed), *v.flags,
                *self._quick("--epochs", "20"),
            ]  # fmt: skip
            commands.append((f"train-student-{v.key}-seed{seed}", args))
        self.pkd_concurrently(commands)


def _evaluate_all(paths: DemoPaths, world: ToyWorld, seeds: Sequence[int], say: Callable[[str], None]) -> dict[str, Any]:
    """Every student, the proxy before/after alignment and the teacher itself, on the held-out
    teacher samples: NLL per token, top-1 agreement, exact match of the stated answer (the toy
    recipe's [eval] settings, whose answer_pattern is the task family's ANSWER_RE); for students
    also exact match split by whether the teacher answered that prompt right."""
    from pkd.config import RunConfig, load_recipe
    from pkd.progress import StepProgress
    from pkd.steps.evaluate import evaluate
    from pkd.toy.diagnose import answers_by_teacher_correctness

    base = load_recipe().eval
    jobs: list[tuple[str, int | None, str]] = [
        ("teacher", None, str(world.teacher)),
        ("proxy_before", None, str(world.proxy)),
        *(("proxy_after", s, str(_proxy_adapter(paths.proxy(s)))) for s in seeds),
    ]
    for v in VARIANTS:
        if v.cache is None:
            jobs.append((v.key, None, str(world.student)))
        else:
            jobs += [(v.key, s, str(paths.student(v.key, s) / "model")) for s in seeds]
    say("\nscoring every model on the held-out teacher samples")
    out: dict[str, Any] = {}
    heldout = paths.artifact("teacher-heldout")
    with step_console("eval", str(paths.run / "eval")), StepProgress(len(jobs), description="eval", unit="models") as progress:
        for key, seed, model in jobs:
            cfg = base.model_copy(update={"model": model, "samples": str(heldout)})
            report = evaluate(cfg, RunConfig())
            if key not in ("teacher", "proxy_before", "proxy_after"):  # students: where the teacher erred
                split = answers_by_teacher_correctness(Path(model), heldout)
                report["em_teacher_right"] = split["teacher_right"]["exact_match"]
                report["em_teacher_wrong"] = split["teacher_wrong"]["exact_match"]
                report["repeats_teacher_error"] = split["teacher_wrong"]["repeats_teacher"]
            out.setdefault(key, {})["all" if seed is None else str(seed)] = report
            progress.update(done=1, tokens=report["tokens"])
    return out


def _bytes_per_token(cache: Path) -> float:
    from pkd.store import Folder

    m = Folder(str(cache)).read_manifest()
    return m.total_bytes / max(m.tokens, 1)


def _diagnose(paths: DemoPaths, world: ToyWorld, seeds: Sequence[int]) -> dict[str, Any]:
    """Per cache: how ℓ separates wrong teacher responses from right ones, and the proxy's top-1
    agreement with the teacher per position class; for the aligned proxy the mean over seeds,
    with each seed's own under "aligned_per_seed". Refuses caches whose samples are not in the
    same order, since then a seed would not give every variant the same data order."""
    from transformers import AutoTokenizer

    from pkd.toy.diagnose import agreement_by_position, sample_order, weight_separation

    unaligned = paths.cache("unaligned", seeds[0])
    order = sample_order(unaligned)
    for seed in seeds:
        for kind in ("aligned", "sampled"):
            if sample_order(paths.cache(kind, seed)) != order:
                raise DemoError(f"{paths.cache(kind, seed)} and {unaligned} hold different samples or orders: seeds would not pair")
    tokenizer = AutoTokenizer.from_pretrained(world.tokenizer)
    teacher = paths.artifact("teacher")

    def diagnose(cache: Path) -> dict[str, Any]:
        return {"weights": weight_separation(teacher, cache), "agreement": agreement_by_position(cache, tokenizer)}

    per_seed = {str(s): diagnose(paths.cache("aligned", s)) for s in seeds}
    return {"aligned": mean_of(list(per_seed.values())), "unaligned": diagnose(unaligned), "aligned_per_seed": per_seed}


def _proxy_adapter(proxy_dir: Path) -> Path:
    """The aligned proxy `pkd proxy-align` wrote: its adapter (LoRA) or its model (full)."""
    for name in ("adapter", "model"):
        if (proxy_dir / name).is_dir():
            return proxy_dir / name
    raise DemoError(f"{proxy_dir}: no aligned proxy (adapter/ or model/) in it")
