"""`pkd eval`: how closely a model follows held-out teacher responses.

Reads `pkd teacher-sample` output (its manifest's Parquet shards, streamed) and a model: a base
or merged model directory, or a LoRA adapter (its base from `--base` or the adapter's record).
Per sample, the teacher response is scored teacher-forced after the chat-templated prompt (by
the engine's scorer, pkd.engines.hf.score_model):
- NLL per token of the response (and its perplexity);
- top-1 agreement: how often the model's argmax equals the teacher's next token;
- exact match: for prompts carrying a `reference`, the greedy answer (or, with
  `answer_pattern`, the answer it states) equals it after whitespace/case normalisation;
- with `tasks`, standard benchmarks through lm-evaluation-harness (pkd.student.benchmarks), in
  the same report under "benchmarks".
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

from pkd.config import EvalConfig, RunConfig
from pkd.errors import ConfigError, InputError, StorageError
from pkd.store import Folder
from pkd.teacher.samples import count_teacher_samples, iter_teacher_samples, open_teacher_samples
from pkd.models.chat import encode_chat
from pkd.answers import matches


def load_model(path: str, base: str | None):
    """(model, tokenizer) for a model directory or a LoRA adapter directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise InputError(f"{p}: neither a model (config.json) nor a LoRA adapter (adapter_config.json)")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if (p / "adapter_config.json").is_file():
        from peft import PeftModel

        base = base or json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ConfigError(f"{p} is a LoRA adapter whose base model {base!r} is not a local folder: pass --base DIR")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(p))
    else:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    tok_dir = p if (p / "tokenizer_config.json").is_file() else Path(base or p)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, AutoTokenizer.from_pretrained(tok_dir)


def encode(tokenizer, messages: list[dict[str, str]], response: str, max_length: int) -> tuple[list[int], int]:
    """Prompt + response ids as cache-logits renders them, cut at `max_length`, and where the
    response starts."""
    chat = encode_chat(tokenizer, messages, response)
    return chat.ids[:max_length], chat.response_start


def _check_report_path(out: Path) -> None:
    """Refuse a report path that is a folder or cannot be written, before the model loads and
    the scoring runs rather than after."""
    if out.is_dir():
        raise StorageError(f"--out {out} is a folder, not a report file: give a file path such as {out / 'eval.json'}")
    Folder(str(out.parent)).check_folder("--out's folder", write=True)


def evaluate(cfg: EvalConfig, run: RunConfig, *, progress: bool = False) -> dict[str, Any]:
    """Score `cfg.model` on the teacher samples `cfg.samples` names and, with `cfg.tasks`, on
    standard benchmarks (lm-eval); one report. Samples are scored only where named (--samples, or
    [eval] samples in a recipe): a run's folder is no default, since the model may have nothing to
    do with that run (after the demo it silently scored the demo's held-out samples). With tasks
    and no samples named the report says so ("skipped"). `progress` draws pkd's bar on the
    terminal."""
    if not cfg.model:
        raise ConfigError("[eval] model: no model given (--model DIR)")
    if not cfg.samples and not cfg.tasks:
        raise ConfigError("[eval] samples: nothing to score: name held-out teacher samples with --samples DIR (a `pkd teacher-sample` folder), or benchmarks with --tasks")
    if cfg.out:
        _check_report_path(Path(cfg.out))
    if cfg.log_samples and not (cfg.tasks and cfg.out):
        raise ConfigError("[eval] log_samples: logs lm-eval's documents beside the report: give --tasks and --out")
    manager = None
    if cfg.tasks:  # task names and data checked before the model loads and the teacher samples are scored
        from pkd.student.benchmarks import prepare_tasks

        manager = prepare_tasks(cfg.tasks, cfg.include_path)
    model, tok = load_model(cfg.model, cfg.base)
    report: dict[str, Any] = {"model": cfg.model}
    if cfg.samples:
        report |= _teacher_metrics(cfg, model, tok, cfg.samples, progress)
    else:
        report["skipped"] = "teacher-sample metrics: no teacher samples named (--samples)"
    if cfg.tasks:
        from pkd.student.benchmarks import run_benchmarks

        report["benchmarks"] = run_benchmarks(
            model, tok, cfg.tasks, include_path=cfg.include_path, manager=manager, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
            batch_size=cfg.batch_size, max_length=cfg.max_length, seed=run.seed, apply_chat_template=cfg.apply_chat_template,
            gen_kwargs=cfg.gen_kwargs, samples_path=Path(cfg.out).with_suffix(".samples.jsonl") if cfg.log_samples and cfg.out else None,
            progress=progress,
        )  # fmt: skip
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _teacher_metrics(cfg: EvalConfig, model: Any, tok: Any, samples: str, progress: bool) -> dict[str, Any]:
    """NLL per token, top-1 agreement and exact match on the teacher's samples."""
    from pkd.engines.hf import greedy_answers, teacher_forced_metrics
    from pkd.progress import StepProgress

    pattern = re.compile(cfg.answer_pattern) if cfg.answer_pattern else None
    split = None if cfg.split in (None, "all") else cfg.split
    nll = agree = tokens = rows = 0.0
    em_hits = em_rows = 0
    folder = Folder(samples)
    manifest = open_teacher_samples(folder)
    total = count_teacher_samples(folder, manifest, split)
    rows_iter = itertools.islice(iter_teacher_samples(folder, manifest, split), cfg.limit)
    with StepProgress(min(total, cfg.limit or total), description="eval", enabled=progress) as bar:
        while batch := list(itertools.islice(rows_iter, cfg.batch_size)):
            encoded = [encode(tok, r.messages, r.response, cfg.max_length) for r in batch]
            m = teacher_forced_metrics(model, [ids for ids, _ in encoded], [start for _, start in encoded], batch_tokens=cfg.batch_size * cfg.max_length, pad_id=tok.pad_token_id or 0)
            nll += m["nll_per_token"] * m["tokens"]
            agree += m["top1_agreement"] * m["tokens"]
            tokens += m["tokens"]
            rows += len(batch)
            with_ref = [(r, ids[:start]) for r, (ids, start) in zip(batch, encoded) if r.reference]
            if with_ref:
                em_rows += len(with_ref)
                em_hits += sum(matches(a, r.reference, pattern) for (r, _), a in zip(with_ref, greedy_answers(model, tok, [p for _, p in with_ref], cfg.max_new_tokens)))
            bar.update(done=len(batch), tokens=m["tokens"])
    if not rows:
        raise InputError(f"{samples}: no samples in split {cfg.split!r}")
    return {
        "samples": samples,
        "split": cfg.split or "all",
        "rows": int(rows),
        "tokens": int(tokens),
        "nll_per_token": nll / max(tokens, 1),
        "perplexity": math.exp(min(nll / max(tokens, 1), 50.0)),
        "top1_agreement": agree / max(tokens, 1),
        "exact_match": em_hits / em_rows if em_rows else None,
        "exact_match_rows": em_rows,
        "answer_pattern": cfg.answer_pattern,
    }
