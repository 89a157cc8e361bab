"""Standard benchmarks for a student (gsm8k, arc_easy, ... or a local task) through
lm-evaluation-harness (`lm-eval`, the `eval` extra), on the model `pkd eval` has loaded (base,
merged or base + LoRA adapter) via lm-eval's Hugging Face model class.

Task data is loaded task by task before any scoring, so a task whose data cannot be fetched
(offline, a private dataset, a missing file) stops the run naming that task, before minutes of
scoring are spent on the others.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

from pkd.errors import ConfigError, InputError
from pkd.progress import status


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("[eval] tasks: standard benchmarks need lm-evaluation-harness: pip install 'pkd[eval]' (or lm-eval)") from None
    return lm_eval


def prepare_tasks(tasks: list[str], include_path: str | None = None) -> Any:
    """lm-eval's TaskManager once every task name is known and its data readable: run before the
    model loads, so a typo or an unreachable dataset costs seconds, not a scoring pass."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"[eval] include_path = {include_path}: not a folder of lm-eval task YAML files")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include_path})" if include_path else " (a local task needs --include-path DIR)"
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"[eval] tasks: {', '.join(map(repr, unknown))} not known to lm-eval {lm_eval.__version__}{where}{hint}")
    for name in tasks:  # fetch every task's data first: fail fast, naming the task
        try:
            get_task_dict([name], manager)
        except Exception as e:  # noqa: BLE001 - datasets/hub raise many types; all mean "no data"
            raise InputError(
                f"benchmark task {name!r}: its data could not be fetched or read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "check the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), the dataset's access, or point --include-path at a local copy of the task"
            ) from None
    return manager


def run_benchmarks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: str | None = None,
    manager: Any = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
    apply_chat_template: bool = False,
    gen_kwargs: str | None = None,
    samples_path: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run `tasks` on the model in memory; returns, per task, its metrics (e.g. "acc,none") and
    sample count, with the settings that produced them. `manager`: from `prepare_tasks` (else
    made here). `apply_chat_template`: prompts in the model's chat format (a chat-trained
    student); `gen_kwargs`: lm-eval's "key=value,..." for generation tasks; `samples_path`: every
    scored document as JSON lines there. `progress`: a spinner while lm-eval runs."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or prepare_tasks(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    with status(f"lm-eval: {', '.join(tasks)}", enabled=progress):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=samples_path is not None,
            apply_chat_template=apply_chat_template, gen_kwargs=gen_kwargs,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )  # fmt: skip
    if samples_path is not None:
        _write_samples(samples_path, out.get("samples", {}))
    scores = {  # "metric,filter" pairs only: sample_len is a count (in "samples"), with no stderr
        task: {k: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))}
        for task, metrics in out["results"].items()
    }
    samples = {task: n.get("effective", n.get("original")) for task, n in out.get("n-samples", {}).items()}
    return {
        "tasks": scores,
        "samples": samples,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "include_path": include_path,
        "apply_chat_template": apply_chat_template,
        "gen_kwargs": gen_kwargs,
        "lm_eval_version": lm_eval.__version__,
    }


def _write_samples(path: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    """lm-eval's per-document records (prompt, response, target, scores), one JSON line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for task, docs in samples.items():
            for doc in docs:
                f.write(json.dumps({"task": task, **doc}, default=str, ensure_ascii=False) + "\n")
