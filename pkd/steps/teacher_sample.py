"""`pkd teacher-sample`: prompts -> teacher responses from a paid, flaky, rate-limited API.

This step plans and chooses the mode; the parts live in pkd.teacher: the request body and
per-prompt seeds (request), the online client with its retry policy and reply checks (online), the
Batch API client (batch), the cost guard (budget), and the output folder's writer beside its
reader (samples), which documents the folder and why a resumed run writes every sample exactly
once after `kill -9`. Modes: online (one request per prompt, now); batch (the same requests
through the Batch API at its price: submit, then poll and collect, by rerunning if need be);
`--write-requests-only` (the batch request files, to run elsewhere, e.g. `vllm run-batch`) and
`--from-batch-output` (import such a run's output files).

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
from dataclasses import dataclass, field
from typing import Any

from pkd.config import RunConfig, TeacherSampleConfig
from pkd.errors import ConfigError, FailureBudgetError, PkdError
from pkd.progress import StepProgress
from pkd.records import Manifest
from pkd.store import Folder
from pkd.teacher import batch
from pkd.teacher.budget import Budget, Estimate, estimate, spent
from pkd.teacher.online import Teacher, is_transient
from pkd.teacher.prompts import Prompt, load_prompts, prompts_fingerprint
from pkd.teacher.request import SEEDS
from pkd.teacher.samples import FAILURES, Outcome, Writer, open_output
from pkd.teacher.splits import split_of


@dataclass(frozen=True)
class Plan:
    """What a run will do; `--dry-run` prints it and sends nothing."""

    out: str
    base_url: str
    model: str
    mode: str  # online | batch
    prompts: int  # in the set, after --limit
    done: int  # already committed in the output folder
    todo: int  # prompts to request = requests to send before retries (n samples each)
    samples: int  # todo × n
    max_completion_tokens: int  # todo × n × max_tokens, an upper bound
    splits: dict[str, int]  # todo prompts per split
    spent_usd: float | None  # what the folder's answers cost, at the given prices
    estimate: Estimate | None = None  # the todo prompts' upper bound (with --dry-run or --max-cost)
    request_files: int = 0  # batch files the todo prompts make


@dataclass(frozen=True)
class Summary:
    plan: Plan
    counts: dict[str, int]  # the whole folder (manifest counts)
    session: dict[str, int]  # this invocation only
    elapsed_s: float
    pending: list[str] = field(default_factory=list)  # batches submitted, not yet collected
    written: list[str] = field(default_factory=list)  # request files written (--write-requests-only)


@dataclass
class _Run:
    plan: Plan
    prompts: list[Prompt]  # the set, after --limit
    todo: list[Prompt]
    folder: Folder
    manifest: Manifest
    failures: list[dict[str, Any]]
    retrying: dict[str, dict[str, Any]]
    last: dict[str, dict[str, Any]]  # each handled prompt's last ledger line


def _prepare(cfg: TeacherSampleConfig, run: RunConfig, hold: ExitStack | None, priced: bool = False) -> _Run:
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
        out=folder.uri, base_url=cfg.base_url, model=cfg.model, mode=cfg.mode, prompts=len(prompts), done=len(prompts) - len(todo), todo=len(todo),
        samples=len(todo) * cfg.n, max_completion_tokens=len(todo) * cfg.n * cfg.max_tokens,
        splits=dict(Counter(split_of(p.id, cfg.split_ratios) for p in todo)),
        spent_usd=spent(manifest.counts, cfg) if cfg.price_input is not None and cfg.price_output is not None else None,
        estimate=estimate(cfg, todo) if priced else None, request_files=len(batch.split_requests(cfg, todo)) if priced and cfg.mode == "batch" else 0,
    )  # fmt: skip
    return _Run(plan, prompts, todo, folder, manifest, failures, retrying, last)


def plan_teacher_sample(cfg: TeacherSampleConfig, run: RunConfig) -> Plan:
    """Validate everything, count the work and its cost; reads the output folder, changes and sends nothing."""
    return _prepare(cfg, run, None, priced=True).plan


async def _sample_all(todo: list[Prompt], cfg: TeacherSampleConfig, writer: Writer, bar: StepProgress) -> None:
    teacher = Teacher(cfg, os.environ.get(cfg.api_key_env) or None, first_wave=min(cfg.concurrency, len(todo)), note=bar.note)
    budget = Budget(cfg, spent(writer.manifest.counts, cfg))
    queue = iter(todo)  # shared by the workers: each prompt is taken exactly once
    sent = 0

    async def worker() -> None:
        nonlocal sent
        for prompt in queue:
            if budget.stopped or (reserved := budget.reserve(prompt)) is None:
                return  # over budget: send nothing more, let the requests in flight finish (they are paid)
            sent += 1
            outcome = await teacher.sample(prompt)
            budget.settle(reserved, outcome.ledger.get("prompt_tokens"), outcome.ledger.get("completion_tokens"))
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
    if budget.stopped:
        raise budget.error(f"{len(todo) - sent:,} prompts not sent")


def _collector(cfg: TeacherSampleConfig, r: _Run, writer: Writer, bar: StepProgress) -> batch.Collector:
    """Batch answers go through the writer like online ones; a failed prompt answered replaces its failure."""

    def add(outcome: Outcome, before: dict[str, Any] | None) -> None:
        if before is not None:
            writer.retrying[before["prompt_id"]] = before
        writer.add(outcome)
        bar.update(done=before is None, requests=1, tokens=outcome.ledger.get("completion_tokens") or 0, failures=int(outcome.ledger["status"] == "failed"))

    return batch.Collector(cfg, r.prompts, r.last, add)


def _batch(cfg: TeacherSampleConfig, r: _Run, todo: list[Prompt], writer: Writer, bar: StepProgress) -> list[str]:
    """Submit what no batch holds yet (within the budget), then poll and collect; the pending batches."""
    client = batch.BatchClient(cfg, r.folder, batch.load_state(r.folder), os.environ.get(cfg.api_key_env) or None)
    try:
        held = {pid for part in client.state.pending() for pid in part.prompts}
        new = [p for p in todo if p.id not in held]
        if new and cfg.max_cost is not None:
            est, paid = estimate(cfg, new), spent(writer.manifest.counts, cfg)
            if paid + (est.usd or 0.0) > cfg.max_cost:
                raise Budget(cfg, paid).error(f"and a batch of {est.line()} could cost more than the rest; nothing was submitted")
        if new:
            client.add_parts(new)
        collector = _collector(cfg, r, writer, bar)
        pending = batch.run_batches(client, collector, wait=cfg.wait, say=bar.say, commit=lambda: writer.flush(complete=False))
        writer.session.update({f"batch_{k}": v for k, v in collector.stats.items() if v})
        return [f"{p.name} ({p.batch_id})" for p in pending]
    finally:
        client.close()


def _write_requests(cfg: TeacherSampleConfig, r: _Run) -> list[str]:
    """Request files for another machine (`vllm run-batch`, a provider's console): requests/part-NNNNN.jsonl."""
    written = []
    for i, (_, data) in enumerate(batch.split_requests(cfg, r.todo)):
        rel = f"requests/part-{i:05d}.jsonl"
        r.folder.write_bytes(rel, data)
        written.append(r.folder.where(rel))
    return written


def run_teacher_sample(cfg: TeacherSampleConfig, run: RunConfig, *, progress: bool = True, requests_only: bool = False, imports: list[str] | None = None) -> Summary:
    """Sample the teacher for every prompt not yet in the output folder; resumable at any point."""
    start = time.monotonic()
    with ExitStack() as hold:
        r = _prepare(cfg, run, hold)
        plan, folder = r.plan, r.folder
        r.manifest.counts["prompts"] = plan.prompts
        writer = Writer(folder, r.manifest, r.failures, cfg.shard_size, cfg.commit_interval_s, r.retrying)
        batching = cfg.mode == "batch" and not imports and not requests_only
        if cfg.mode == "online" and not requests_only and (waiting := batch.load_state(folder).pending()):
            raise ConfigError(f"{len(waiting):,} batches of this folder are not collected yet: rerun with --batch to collect them (online, their prompts would be paid twice)")
        if not r.todo and r.manifest.complete and not (batching and batch.load_state(folder).pending()):
            return Summary(plan, dict(writer.manifest.counts), {}, time.monotonic() - start)
        if not folder.has_manifest() and (batching or requests_only or imports):
            folder.write_manifest(writer.manifest)  # the folder is ours before a batch's or a request file lands in it
        if requests_only:
            return Summary(plan, dict(writer.manifest.counts), {}, time.monotonic() - start, written=_write_requests(cfg, r))
        pending: list[str] = []
        online = [p for p in r.todo if p.id in r.retrying] if batching and cfg.retry_online else r.todo if not batching and not imports else []
        with StepProgress(plan.prompts, done=plan.done, description="teacher-sample", unit="prompts", requests=True, enabled=progress) as bar:
            try:
                if imports:
                    collector = _collector(cfg, r, writer, bar)
                    collector.take(batch.parse_output(list(batch.read_outputs(imports))), [p.id for p in r.todo], None)
                    writer.session.update({f"batch_{k}": v for k, v in collector.stats.items() if v})
                elif batching:
                    pending = _batch(cfg, r, [p for p in r.todo if p not in online], writer, bar)
                if online:
                    asyncio.run(_sample_all(online, cfg, writer, bar))
            finally:
                writer.flush(complete=False)  # whatever was answered is paid for: keep it
        writer.flush(complete=not pending and (not imports or all(p.id in r.last for p in r.todo)))
        return Summary(plan, dict(writer.manifest.counts), dict(writer.session), time.monotonic() - start, pending=pending)


def retryable_failures(counts: dict[str, int]) -> int:
    """How many of a folder's failed prompts `--retry-failed` would request again."""
    return sum(v for k, v in counts.items() if k.startswith("failed_") and is_transient(k[len("failed_"):]))
