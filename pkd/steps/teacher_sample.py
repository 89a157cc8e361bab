"""`pkd teacher-sample`: prompts -> teacher responses from a paid, flaky, rate-limited API.

This step plans and runs; the parts live in pkd.teacher: the request body and per-prompt seeds
(request), the online client with its retry policy and reply checks (online), and the output
folder's writer beside its reader (samples), which documents the folder and why a resumed run
writes every sample exactly once after `kill -9`.

A run stops with `FailureBudgetError` after `max_failures` prompts failed for good;
`--retry-failed` requests the transiently failed ones again. Pending answers are committed every
`shard_size` rows or `commit_interval_s` seconds, whichever comes first, so a crash loses at most
that much paid work. The output folder is checked writable before the first request, and a local
one is locked (flock on the folder) against a second run. The API key comes from the environment.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from pkd.config import RunConfig, TeacherSampleConfig
from pkd.errors import ConfigError, FailureBudgetError, PkdError
from pkd.progress import StepProgress
from pkd.records import Manifest
from pkd.store import Folder
from pkd.teacher.online import Teacher, is_transient
from pkd.teacher.prompts import Prompt, load_prompts, prompts_fingerprint
from pkd.teacher.request import SEEDS
from pkd.teacher.samples import FAILURES, Writer, open_output
from pkd.teacher.splits import split_of


@dataclass(frozen=True)
class Plan:
    """What a run will do; `--dry-run` prints it and sends nothing."""

    out: str
    base_url: str
    model: str
    prompts: int  # in the set, after --limit
    done: int  # already committed in the output folder
    todo: int  # prompts to request = requests to send before retries (n samples each)
    samples: int  # todo × n
    max_completion_tokens: int  # todo × n × max_tokens, an upper bound
    splits: dict[str, int]  # todo prompts per split


@dataclass(frozen=True)
class Summary:
    plan: Plan
    counts: dict[str, int]  # the whole folder (manifest counts)
    session: dict[str, int]  # this invocation only
    elapsed_s: float


def _prepare(cfg: TeacherSampleConfig, run: RunConfig, hold: ExitStack | None) -> tuple[Plan, list[Prompt], Folder, Manifest, list[dict[str, Any]], dict[str, dict[str, Any]]]:
    if not cfg.prompts:
        raise ConfigError("no prompt set: pass --prompts PATH or set [teacher_sample] prompts in the recipe")
    prompts = load_prompts(cfg.prompts, split=cfg.prompts_split, fields=cfg.prompts_fields)
    fingerprint = prompts_fingerprint(prompts)
    prompts = prompts[: cfg.limit]
    folder = Folder(cfg.out or run.artifact_dir("teacher"))
    if hold is not None:  # a real run: writable, and ours alone until `hold` closes
        folder.check_folder("--out", write=True)
        hold.enter_context(folder.locked("`pkd teacher-sample`"))
    manifest, last, failures = open_output(folder, fingerprint, {**cfg.model_dump(mode="json"), "seeds": SEEDS}, clean=hold is not None)
    retrying = {pid: line for pid, line in last.items() if cfg.retry_failed and line["status"] == "failed" and is_transient(line["error"]["kind"])}
    todo = [p for p in prompts if p.id not in last or p.id in retrying]
    plan = Plan(
        out=folder.uri, base_url=cfg.base_url, model=cfg.model, prompts=len(prompts), done=len(prompts) - len(todo), todo=len(todo),
        samples=len(todo) * cfg.n, max_completion_tokens=len(todo) * cfg.n * cfg.max_tokens,
        splits=dict(Counter(split_of(p.id, cfg.split_ratios) for p in todo)),
    )  # fmt: skip
    return plan, todo, folder, manifest, failures, retrying


def plan_teacher_sample(cfg: TeacherSampleConfig, run: RunConfig) -> Plan:
    """Validate everything and count the work; reads the output folder, changes and sends nothing."""
    return _prepare(cfg, run, None)[0]


async def _sample_all(todo: list[Prompt], cfg: TeacherSampleConfig, writer: Writer, bar: StepProgress) -> None:
    teacher = Teacher(cfg, os.environ.get(cfg.api_key_env) or None, first_wave=min(cfg.concurrency, len(todo)))
    queue = iter(todo)  # shared by the workers: each prompt is taken exactly once

    async def worker() -> None:
        for prompt in queue:
            outcome = await teacher.sample(prompt)
            writer.add(outcome)
            failed = outcome.ledger["status"] == "failed"
            bar.update(done=1, requests=outcome.ledger["attempts"], tokens=outcome.ledger.get("completion_tokens") or 0, failures=int(failed))
            if failed and writer.session["failed"] > cfg.max_failures:
                kinds = ", ".join(f"{k[7:]}: {v}" for k, v in sorted(writer.session.items()) if k.startswith("failed_"))
                raise FailureBudgetError(
                    f"{writer.session['failed']} prompts failed for good ({kinds}), over the budget of {cfg.max_failures} "
                    f"(--max-failures); see {writer.folder.where(FAILURES)}. Committed work is kept: fix the cause and rerun with --retry-failed to continue"
                )
            await writer.commit_if_due()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(cfg.concurrency, len(todo))):
                group.create_task(worker())
    except BaseExceptionGroup as eg:  # a worker's PkdError cancelled the others: surface that one
        first = next((e for e in eg.exceptions if isinstance(e, PkdError)), None)
        if first is None:
            raise
        raise first from None
    finally:
        if teacher.capped_waits:
            writer.session["retry_after_capped"] += teacher.capped_waits
        await teacher.client.close()


def run_teacher_sample(cfg: TeacherSampleConfig, run: RunConfig, *, progress: bool = True) -> Summary:
    """Sample the teacher for every prompt not yet in the output folder; resumable at any point."""
    start = time.monotonic()
    with ExitStack() as hold:
        plan, todo, folder, manifest, failures, retrying = _prepare(cfg, run, hold)
        manifest.counts["prompts"] = plan.prompts
        writer = Writer(folder, manifest, failures, cfg.shard_size, cfg.commit_interval_s, retrying)
        if not todo and manifest.complete:
            return Summary(plan, dict(writer.manifest.counts), {}, time.monotonic() - start)
        with StepProgress(plan.prompts, done=plan.done, description="teacher-sample", unit="prompts", requests=True, enabled=progress) as bar:
            try:
                if todo:
                    asyncio.run(_sample_all(todo, cfg, writer, bar))
            finally:
                writer.flush(complete=False)  # whatever was answered is paid for: keep it
        writer.flush(complete=True)
        return Summary(plan, dict(writer.manifest.counts), dict(writer.session), time.monotonic() - start)


def retryable_failures(counts: dict[str, int]) -> int:
    """How many of a folder's failed prompts `--retry-failed` would request again."""
    return sum(v for k, v in counts.items() if k.startswith("failed_") and is_transient(k[len("failed_"):]))
