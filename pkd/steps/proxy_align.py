"""`pkd proxy-align`: teacher samples (D_w, D_p) + proxy base -> aligned proxy (DESIGN §1 stage 1).

Stages, each committed as a folder before the manifest records it:
  warmup/model/            SFT of the proxy on D_w (LoRA adapter, or full weights)
  warmup/metrics.json      held-out figures of the base model and after warm-up: teacher NLL/token,
                           top-1 agreement, task skill (greedy exact match against the prompts'
                           references; lm-eval tasks with --eval-tasks)
  round-KK/samples.jsonl   the current proxy's response per prompt of chunk KK of D_p
  round-KK/sampling.json   engine, token count and timings of that sampling (and whether vLLM
                           sampled a merged copy of the proxy, made in the round's work folder)
  round-KK/model/          after DPO + NLL on (teacher = chosen, proxy = rejected) pairs
  round-KK/metrics.json    the same held-out figures, reward margin/accuracy, timings
  warmup/trainer/, round-KK/trainer/   the trackers' local files (`report_to`, e.g. tensorboard runs/)
  adapter/ (LoRA) or model/ (full)   the output proxy: hard links to the selected stage's files
                           (pkd.align.select: by default the lowest held-out teacher NLL among the
                           stages that kept the base proxy's skill; --select last: the last round)
  merged/                  with --merge: base + adapter folded into one model
  report.json, report.png  the alignment report
  manifest.json            kind "proxy": lineage (teacher samples, base weights), config, and
                           in `counts` the stages done: warmup, rounds_sampled, rounds_done, and
                           `selected` (0 = warm-up, k = round k)

Resume: a stage is written under `.tmp-*` and renamed into place, then the manifest lists its
files; a rerun deletes whatever the manifest does not list and continues after the last
committed stage (a round's samples are committed before its training, so a kill during training
retrains on the same pairs). Orders and seeds depend only on ids and the run seed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkd.align.data import AlignData, preference_pairs, sft_rows, split_samples
from pkd.align.select import Selection, choose_stage
from pkd.models.resolve import resolve_model
from pkd.teacher.samples import read_teacher_samples, teacher_fingerprint
from pkd.config import ProxyAlignConfig, Recipe
from pkd.errors import ConfigError, InputError
from pkd.fingerprint import files_fingerprint, sha256_file, tokenizer_fingerprint
from pkd.models.trainer_args import ALIGN_KEYS, ALIGN_OWNED, check_trainer_settings, tracker_project, training_settings
from pkd.progress import status
from pkd.records import MANIFEST_NAME, FileEntry, Manifest
from pkd.store import Folder

# Settings that may change between a run and its resumption (they do not change what is trained).
FREE_KEYS = {"teacher", "model", "student", "out", "engine", "sample_merged", "gpu_memory_utilization", "merge", "logging_steps", "report_to", "select", "max_skill_drop"}
STATE_KEYS = tuple(k for k in ProxyAlignConfig.model_fields if k not in FREE_KEYS)
TMP = ".tmp-"


@dataclass
class Summary:
    out: str
    report: dict[str, Any]
    ran: list[str] = field(default_factory=list)  # stages run by this invocation
    warnings: list[str] = field(default_factory=list)
    skill_warning: str | None = None  # every stage lost more skill than --max-skill-drop allows
    elapsed_s: float = 0.0


def load_chat_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not tokenizer.chat_template:
        raise InputError(
            f"{model_dir}: the proxy tokenizer has no chat template, so teacher chats cannot be rendered the way the proxy "
            "(and later the student) sees them; use an instruct/chat checkpoint or add a `chat_template` to its tokenizer_config.json"
        )
    return tokenizer


def vocab_warning(tokenizer: Any, model_dir: Path, student: str) -> str | None:
    """Why a logit cache from this proxy would not fit `student` (None if it would)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        s_tok = AutoTokenizer.from_pretrained(student)
        s_vocab = AutoConfig.from_pretrained(student).get_text_config().vocab_size
    except Exception as e:  # noqa: BLE001
        return f"could not load the student {student!r} to compare vocabularies ({type(e).__name__}: {e})"
    p_vocab = AutoConfig.from_pretrained(str(model_dir)).get_text_config().vocab_size
    problems = []
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(s_tok):
        problems.append(f"tokenizers differ ({len(tokenizer)} vs {len(s_tok)} tokens, or other merges/special tokens/chat template)")
    if p_vocab > s_vocab:
        problems.append(f"proxy vocab {p_vocab} > student vocab {s_vocab}")
    if not problems:
        return None
    return f"proxy {model_dir} does not match the student {student}: {'; '.join(problems)}. A logit cache from this proxy would be useless for that student (train-student refuses it)."


def resolve_engine(name: str) -> str:
    """"auto": vLLM on a GPU, transformers on a CPU, as for scoring. On this project's CPU
    machines a round's generation took 7.4 s with transformers against 24.5 s with vLLM on the
    merged LoRA (bench/proxy_align.py, SmolLM2-135M, 16 prompts): vLLM's child process and engine
    start cost more than its faster sampling saves."""
    from pkd.engines import scoring_engine

    return name if name != "auto" else scoring_engine()


# the output folder --------------------------------------------------------------------------------


def _entries(root: Path, rel: str) -> list[FileEntry]:
    path = root / rel
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [FileEntry(path=p.relative_to(root).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size, rows=0) for p in files]


class Output:
    """The proxy folder and its manifest; stages commit here."""

    def __init__(self, root: Path, inputs: dict[str, str], config: dict[str, Any]) -> None:
        self.root, self.folder = root, Folder(str(root))
        if not self.folder.has_manifest():
            stray = [p for p in self.folder.listdir() if not p.startswith(TMP)]
            if stray:
                raise InputError(f"{root} is not empty ({stray[0]}, ...) and holds no proxy-align manifest: choose another --out")
            self.manifest = Manifest(kind="proxy", inputs=inputs, config=config, counts={"warmup": 0, "rounds_sampled": 0, "rounds_done": 0})
        else:
            m = self.folder.read_manifest()
            if m.kind != "proxy":
                raise InputError(f"{root} holds a {m.kind!r} artifact, not an aligned proxy: choose another --out")
            changed = [f"{k}: {m.inputs.get(k)} there, {v} now" for k, v in inputs.items() if m.inputs.get(k) != v]
            changed += [f"{k}: {m.config.get(k)!r} there, {config.get(k)!r} now" for k in STATE_KEYS if m.config.get(k) != config.get(k)]
            if changed:
                raise ConfigError(f"{root} holds a proxy aligned from other inputs or settings ({'; '.join(changed)}): choose another --out, or rerun with the same ones")
            m.config = config
            self.manifest = m
        self._drop_uncommitted()

    def _drop_uncommitted(self) -> None:
        listed = {f.path for f in self.manifest.files} | {MANIFEST_NAME}
        for p in sorted(self.root.rglob("*"), key=lambda p: -len(p.parts)) if self.root.exists() else []:
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and rel not in listed:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()

    @property
    def counts(self) -> dict[str, int]:
        return self.manifest.counts

    def scratch(self, name: str) -> Path:
        path = self.root / f"{TMP}{name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, moves: dict[str, Path], *, complete: bool = False, **counts: int) -> None:
        """Rename finished files/folders into place, list them, then write the manifest."""
        for rel, src in moves.items():
            dst = self.root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_dir():
                shutil.rmtree(dst)
            dst.unlink(missing_ok=True)
            os.replace(src, dst)
            fresh = _entries(self.root, rel)
            self.manifest.files = [f for f in self.manifest.files if f.path not in {e.path for e in fresh}] + fresh
        self.manifest.counts.update(counts)
        self.manifest.complete = complete
        self.folder.write_manifest(self.manifest)

    def read_json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# the step -------------------------------------------------------------------------------------------


def run_proxy_align(recipe: Recipe, *, say: Callable[[str], None] | None = None, progress: bool = False) -> Summary:
    """Warm up, then align the proxy for `rounds` rounds; resumes after the last committed stage.
    `progress` draws a bar per training stage on the terminal."""
    start = time.monotonic()
    say = say or (lambda _msg: None)
    cfg, run = recipe.proxy_align, recipe.run
    seed = run.seed if cfg.seed is None else cfg.seed
    if not cfg.model:
        raise ConfigError("no proxy base model: pass --model DIR_OR_HUB_ID or set [proxy_align] model in the recipe")
    out_spec = cfg.out or run.artifact_dir("proxy")
    if "://" in out_spec and not out_spec.startswith("file://"):
        raise ConfigError(f"--out {out_spec!r}: proxy-align writes models with transformers and needs a local folder")
    out_folder = Folder(out_spec.removeprefix("file://"))
    out_folder.check_folder("--out", write=True)  # before models load, not at the warm-up's end
    _check_trainer_table(cfg)
    with out_folder.locked("`pkd proxy-align`"):  # one run per --out (flock: a killed run releases it)
        teacher = Folder(cfg.teacher or run.artifact_dir("teacher"))
        t_manifest, samples = read_teacher_samples(teacher)
        data = split_samples(samples, eval_samples=cfg.eval_samples, seed=seed, where=teacher.uri)
        base_dir = resolve_model(cfg.model, "proxy model")
        tokenizer = load_chat_tokenizer(base_dir)
        summary = Summary(out=out_spec, report={})
        student = cfg.student or recipe.train_student.student
        if student and (warning := vocab_warning(tokenizer, base_dir, student)):
            summary.warnings.append(warning)
            say(f"warning: {warning}")
        config = cfg.model_dump(mode="json", exclude={"trainer"}) | {"seed": seed}
        if settings := training_settings(cfg.trainer):  # absent when empty: folders made before the table still resume
            config["trainer"] = settings
        out = Output(Path(out_spec.removeprefix("file://")), {"teacher": teacher_fingerprint(t_manifest), "proxy_base": files_fingerprint(base_dir)}, config)
        ctx = _Context(cfg, seed, base_dir, tokenizer, data, out, resolve_engine(cfg.engine), say, progress)

        with tracker_project(cfg.trainer.get("project")):
            if not out.counts["warmup"]:
                ctx.warmup()
                summary.ran.append("warmup")
            for k in range(1, cfg.rounds + 1):
                if out.counts["rounds_sampled"] < k:
                    ctx.sample(k)
                if out.counts["rounds_done"] < k:
                    ctx.align(k)
                    summary.ran.append(_round(k))
        summary.report, selection = ctx.finish()
        if selection.skill_kept is False:
            summary.skill_warning = selection.reason
        summary.elapsed_s = time.monotonic() - start
        return summary


def _check_trainer_table(cfg: ProxyAlignConfig) -> None:
    """[proxy_align.trainer] names fields of TRL's SFTConfig (warm-up) or DPOConfig (rounds)."""
    if cfg.trainer:
        from trl import DPOConfig, SFTConfig

        check_trainer_settings(cfg.trainer, "proxy_align", (SFTConfig, DPOConfig), ALIGN_KEYS, ALIGN_OWNED)


def _round(k: int) -> str:
    return f"round-{k:02d}"


@dataclass
class _Context:
    cfg: ProxyAlignConfig
    seed: int
    base_dir: Path
    tokenizer: Any
    data: AlignData
    out: Output
    engine: str
    say: Callable[[str], None]
    progress: bool = False

    @property
    def batch_tokens(self) -> int:
        """Padded tokens per scoring forward: a training micro-batch's worth."""
        return self.cfg.per_device_batch_size * self.cfg.max_length

    def stage_model(self, k: int) -> Path:
        """The proxy after stage k (0 = warm-up)."""
        return self.out.root / ("warmup" if k == 0 else _round(k)) / "model"

    def heldout(self) -> list[tuple[list[int], int]]:
        """Held-out chats tokenized as cache-logits will see them, cut to max_length."""
        from pkd.models.chat import encode_chat

        chats = (encode_chat(self.tokenizer, s.messages, s.response) for s in self.data.heldout)
        return [(c.ids[: self.cfg.max_length], c.response_start) for c in chats]

    def measure(self, model: Any) -> dict[str, Any]:
        """The held-out figures of one stage: teacher NLL/token and top-1 agreement, and task skill
        (greedy exact match against the prompts' references; lm-eval tasks if asked for)."""
        from pkd.align.metrics import response_metrics
        from pkd.answers import exact_match_hits
        from pkd.engines.hf import greedy_answers

        figures: dict[str, Any] = response_metrics(model, self.heldout(), self.batch_tokens)
        graded = [s for s in self.data.heldout if s.reference is not None]
        figures["exact_match_rows"] = len(graded)
        figures["exact_match"] = None
        if graded:
            prompts = [self.tokenizer.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for s in graded]
            answers = greedy_answers(model, self.tokenizer, prompts, self.cfg.max_new_tokens)
            figures["exact_match"] = exact_match_hits(answers, [s.reference for s in graded], self.cfg.answer_pattern) / len(graded)
        if self.cfg.eval_tasks:
            from pkd.student.benchmarks import run_benchmarks

            figures["benchmarks"] = run_benchmarks(
                model, self.tokenizer, self.cfg.eval_tasks, limit=self.cfg.eval_limit, batch_size=self.cfg.per_device_batch_size,
                max_length=self.cfg.max_length, seed=self.seed, progress=self.progress,
            )  # fmt: skip
        return figures

    def describe(self, name: str, figures: dict[str, Any]) -> None:
        em = "" if figures.get("exact_match") is None else f", exact match {figures['exact_match']:.1%}"
        self.say(f"{name}: held-out NLL/token {figures['nll_per_token']:.4f}, top-1 agreement {figures['top1_agreement']:.3f}{em}")

    def warmup(self) -> None:
        from pkd.models.lora import vllm_problems
        from pkd.align.train import free_memory, load_policy, save_proxy, warmup_sft

        cfg = self.cfg
        model = load_policy(self.base_dir, None, cfg, self.seed)  # a fresh LoRA adapter is the identity: this is the base model
        base = self.measure(model)
        self.describe("base model", base)
        stage = self.out.scratch("warmup")
        stats: dict[str, Any] = {"train_samples": len(self.data.warmup), "steps": 0}
        if cfg.warmup_epochs > 0:
            stats |= warmup_sft(model, self.tokenizer, sft_rows(self.data.warmup), cfg, self.seed, stage / "trainer", progress=self.progress, base=base, measure=self.measure)
        after = stats.pop("heldout", None) or self.measure(model)
        self.describe(f"warm-up on {len(self.data.warmup)} samples", after)
        save_proxy(model, self.tokenizer, stage / "model")
        if cfg.lora and (problems := vllm_problems(json.loads((stage / "model" / "adapter_config.json").read_text()))):
            raise ConfigError(f"[proxy_align] these LoRA settings make an adapter vLLM cannot serve ({'; '.join(problems)}); the rounds would fail")
        _write_json(stage / "metrics.json", {"base": base, "warmup": after | stats})
        del model
        free_memory()
        self.out.commit({"warmup": stage}, warmup=1)

    def sample(self, k: int) -> None:
        from pkd.align.sample import sample_round

        cfg = self.cfg
        chunk = self.data.chunk(k - 1, cfg.rounds, cfg.chunk_size)
        prev = self.stage_model(k - 1)
        request = {
            "engine": self.engine, "model_dir": str(self.base_dir if cfg.lora else prev), "adapter_dir": str(prev) if cfg.lora else None,
            "prompt_token_ids": [self.tokenizer.apply_chat_template(g[0].messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for g in chunk],
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens, "seed": self.seed * 1000 + k,
            "gpu_memory_utilization": cfg.gpu_memory_utilization, "sample_merged": cfg.sample_merged,
        }  # fmt: skip
        started = time.monotonic()
        with status(f"{_round(k)}: sampling {len(chunk)} proxy responses ({self.engine})", enabled=self.progress):
            result = sample_round(request, self.out.scratch(f"{_round(k)}-sampling"))
        gen_s = time.monotonic() - started  # wall time, with the child process and engine start
        stage = self.out.scratch(f"{_round(k)}-samples")
        lines = [{"prompt_id": g[0].prompt_id, "response": r} for g, r in zip(chunk, result.pop("responses"), strict=True)]
        (stage / "samples.jsonl").write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        _write_json(stage / "sampling.json", {"engine": self.engine, "prompts": len(chunk), "gen_s": gen_s} | result)
        self.out.commit({f"{_round(k)}/samples.jsonl": stage / "samples.jsonl", f"{_round(k)}/sampling.json": stage / "sampling.json"}, rounds_sampled=k)
        shutil.rmtree(stage.parent / f"{TMP}{_round(k)}-sampling", ignore_errors=True)
        how = f"{self.engine}, adapter merged in {result['merge_s']:.1f} s" if result["merged"] else self.engine
        self.say(f"{_round(k)}: sampled {len(chunk)} proxy responses ({how}) in {gen_s:.1f} s")

    def align(self, k: int) -> None:
        from pkd.align.metrics import pair_rewards
        from pkd.align.train import dpo_round, free_memory, load_policy, save_proxy

        cfg, name = self.cfg, _round(k)
        proxy = {line["prompt_id"]: line["response"] for line in map(json.loads, (self.out.root / name / "samples.jsonl").read_text().splitlines())}
        rows, dropped = preference_pairs(self.data.chunk(k - 1, cfg.rounds, cfg.chunk_size), proxy)
        stage = self.out.scratch(name)
        model = load_policy(self.base_dir, self.stage_model(k - 1), cfg)
        if rows:
            pairs, stats = dpo_round(model, self.tokenizer, rows, cfg, self.seed + k, stage / "trainer", stage=name, progress=self.progress, measure=self.measure)
            rewards = pair_rewards(model, pairs, cfg.beta, cfg.max_length, self.batch_tokens)
        else:  # the proxy already says exactly what the teacher says: nothing to prefer
            stats, rewards = {"steps": 0}, {"pairs": 0}
        held = stats.pop("heldout", None) or self.measure(model)
        save_proxy(model, self.tokenizer, stage / "model")
        sampling = self.out.read_json(f"{name}/sampling.json")
        metrics = held | stats | rewards | {"dropped_pairs": dropped} | {k: sampling.get(k) for k in ("engine", "merged", "gen_s", "merge_s", "load_s", "generate_s", "new_tokens")}
        _write_json(stage / "metrics.json", metrics)
        del model
        free_memory()
        moves = {f"{name}/model": stage / "model", f"{name}/metrics.json": stage / "metrics.json"}
        if (stage / "trainer").is_dir():
            moves[f"{name}/trainer"] = stage / "trainer"
        self.out.commit(moves, rounds_done=k)
        shutil.rmtree(stage, ignore_errors=True)
        self.say(f"{name}: {rewards['pairs']} pairs ({dropped} equal, dropped), reward margin {rewards.get('reward_margin', 0):+.4f}, accuracy {rewards.get('reward_accuracy', 0):.3f}")
        self.describe(name, held)

    def finish(self) -> tuple[dict[str, Any], Selection]:
        """The selected stage as the output proxy, optional merge, report; marks the manifest
        complete. A rerun with another --select / --max-skill-drop re-selects without training."""
        from pkd.align.report import plot

        cfg, out = self.cfg, self.out
        stages = self.stages()
        selection = choose_stage(stages, cfg.select, cfg.max_skill_drop)
        reselect = not out.manifest.complete or out.counts.get("selected") != selection.index
        moves: dict[str, Path] = {}
        final = "adapter" if cfg.lora else "model"
        if reselect:
            tmp = out.root / f"{TMP}{final}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.stage_model(selection.index), tmp, copy_function=os.link)  # hard links: no second copy
            moves[final] = tmp
        if cfg.merge and cfg.lora and (reselect or not (out.root / "merged").is_dir()):
            from pkd.align.train import merge

            tmp = out.scratch("merged")
            merge(self.base_dir, self.stage_model(selection.index), tmp, cfg.precision)
            moves["merged"] = tmp
        report = self.report(stages, selection)
        scratch = out.scratch("report")
        moves["report.json"] = _write_json(scratch / "report.json", report)
        if plot(report, scratch / "report.png"):
            moves["report.png"] = scratch / "report.png"
        else:
            self.say("report.png not drawn: matplotlib is not installed (pip install 'pkd[plots]')")
        out.commit(moves, complete=True, selected=selection.index)
        for name in ("trainer", "report", "merged", final):
            shutil.rmtree(out.root / f"{TMP}{name}", ignore_errors=True)
        return report, selection

    def stages(self) -> list[dict[str, Any]]:
        """The report's rows: the base proxy, the warm-up, each round."""
        warm = self.out.read_json("warmup/metrics.json")
        stages = [{"stage": "base"} | warm["base"], {"stage": "warmup"} | warm["warmup"]]
        return stages + [{"stage": _round(k)} | self.out.read_json(f"{_round(k)}/metrics.json") for k in range(1, self.cfg.rounds + 1)]

    def report(self, stages: list[dict[str, Any]], selection: Selection) -> dict[str, Any]:
        from pkd.answers import describe

        held = stages[0]
        return {
            "heldout": {
                "from": self.data.heldout_from, "samples": held["samples"], "tokens": held["tokens"],
                "exact_match_rows": held.get("exact_match_rows", 0), "answer": describe(self.cfg.answer_pattern),
                "eval_tasks": self.cfg.eval_tasks,
            },
            "inputs": self.out.manifest.inputs,
            "final": str(self.out.root / ("adapter" if self.cfg.lora else "model")),
            "selection": selection.as_dict() | {"select": self.cfg.select, "max_skill_drop": self.cfg.max_skill_drop},
            "stages": stages,
        }  # fmt: skip
