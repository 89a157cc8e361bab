"""`pkd teacher-sample`: prompts -> teacher responses from a paid, flaky, rate-limited API.

Output folder (local path or fsspec URI):
  shards/part-NNNNN.parquet  kept samples, zstd, schema `sample_schema()`
  ledger/part-NNNNN.jsonl    one line per prompt handled by that commit: ok, filtered or failed
  failures.jsonl             every prompt that failed for good, with its error kind and message
  manifest.json              rewritten after every commit (complete=false), complete=true at the end

A commit writes its shard, its ledger, then the manifest listing both, each atomically, and all n
samples of a prompt go into the same commit: a prompt is done exactly when a listed ledger names
it. Resuming drops temporaries and unlisted files and requests only the prompts no listed ledger
names, so after `kill -9` every (prompt_id, sample_index) is written once and nothing committed is
requested again.

Requests: one chat completion per prompt asking for n choices, `concurrency` in flight. The retry
policy is ours (the openai client's is off): connection resets, timeouts, 408/409/429/5xx and
malformed responses (bad JSON, or a 200 whose `choices` are not n well-formed choices with
distinct indices in [0, n)) back off exponentially with jitter, honouring Retry-After up to
`retry_after_max_s` (a 429 pauses every worker); a prompt that still fails, or gets another 4xx,
is recorded and the run goes on until `max_failures`; `--retry-failed` requests the transiently
failed ones again. Errors that doom every request (401/403 key, 404 model, a refused connection,
an unknown host, or connection errors on the whole first wave, at least two, before any answer)
stop the run at once. The API key comes from the environment, is scrubbed from every message and is never stored.

Pending answers are committed every `shard_size` rows or `commit_interval_s` seconds, whichever
comes first, so a crash loses at most that much paid work. The output folder is checked writable
before the first request, and a local one is locked (flock on the folder) against a second run.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pkd.config import RunConfig, TeacherSampleConfig
from pkd.errors import ConfigError, EndpointError, FailureBudgetError, InputError, PkdError, StorageError
from pkd.progress import StepProgress
from pkd.teacher.prompts import Prompt, load_prompts, prompts_fingerprint
from pkd.records import FileEntry, Manifest
from pkd.teacher.splits import split_of
from pkd.store import Folder

# Fields that decide what a folder holds; the rest (endpoint URL, concurrency, retries, limit)
# may change between a run and its resumption.
SAMPLING_KEYS = ("model", "system_prompt", "n", "temperature", "top_p", "max_tokens", "seed", "seeds", "top_logprobs", "keep_truncated", "split_ratios")
SEEDS = "per prompt"  # how `seed` reaches the server (prompt_seed); a folder sampled otherwise does not resume
SHARDS, LEDGER, FAILURES = "shards", "ledger", "failures.jsonl"
RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
TRANSIENT_KINDS = frozenset({"timeout", "bad_response", "connection", "http_408", "http_409", "http_429"})  # and http_5xx
DUMMY_KEY = "pkd-no-key"  # sent when the key variable is unset: a local server needs no auth


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The `seed` sent with one prompt's request: derived from the run's seed and the prompt id.

    Why not the run's seed itself: a server seeds each request's generator with it (vLLM does), so
    every prompt would draw the same uniform numbers and the samples would be correlated across
    prompts (in the toy demo at temperature 1, 41% of the teacher's answers came out wrong against
    28% with independent draws). Derived per prompt, draws are independent and still reproducible,
    retries and resumed runs included."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF  # a non-negative int32: every server accepts it


def sample_schema() -> pa.Schema:
    """One row per kept teacher sample. `usage` is the whole request's (shared by its n rows)."""
    text = pa.string()
    return pa.schema([
        pa.field("sample_id", text, nullable=False),  # "<prompt_id>#<sample_index>"
        pa.field("prompt_id", text, nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),  # choice index in [0, n)
        pa.field("split", text, nullable=False),  # warmup | align | distill (pkd.teacher.splits)
        pa.field("messages", pa.list_(pa.struct([("role", text), ("content", text)])), nullable=False),  # as sent
        pa.field("response", text, nullable=False),
        pa.field("finish_reason", text),
        pa.field("usage", pa.struct([("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32())])),
        pa.field("latency_s", pa.float32(), nullable=False),  # of the successful attempt
        pa.field("teacher", text, nullable=False),  # model name the server reported
        pa.field("reference", text),
        pa.field("logprobs", pa.list_(pa.struct([  # per response token, with --top-logprobs only
            ("token", text), ("logprob", pa.float32()), ("top_tokens", pa.list_(text)), ("top_logprobs", pa.list_(pa.float32())),
        ]))),
    ])  # fmt: skip


@dataclass
class Outcome:
    """What happened to one prompt: its kept rows and its ledger line."""

    rows: list[dict[str, Any]]
    ledger: dict[str, Any]


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


def retry_after_s(headers: Any) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or a date."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, float(raw) * scale)
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(raw).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return None


def is_transient(kind: str) -> bool:
    """Whether a failure kind may go away on its own (`--retry-failed` requests those again)."""
    return kind in TRANSIENT_KINDS or (kind.startswith("http_5") and len(kind) == 8)


class _BadResponse(ValueError):
    """A 200 whose body is not the chat completion asked for."""


def check_choices(resp: Any, n: int) -> None:
    """Refuse a 200 that is not n choices with a message each and distinct indices in [0, n):
    the client builds the object without validating it, and a wrong index would file a sample
    under another sample's id."""
    from openai.types.chat import ChatCompletion

    if not isinstance(resp, ChatCompletion):
        raise _BadResponse("the body is not a JSON chat completion")
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list):
        raise _BadResponse(f"'choices' is {type(choices).__name__ if choices is not None else 'missing or null'}, not a list")
    if len(choices) != n:
        raise _BadResponse(f"expected {n} choices, got {len(choices)}")
    seen: set[int] = set()
    for c in choices:
        index = getattr(c, "index", None)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n or index in seen:
            raise _BadResponse(f"choice index {index!r} is missing, repeated or outside [0, {n})")
        seen.add(index)
        message = getattr(c, "message", None)
        if message is None or not isinstance(getattr(message, "content", None), (str, type(None))):
            raise _BadResponse(f"choice {index} has no message with text content")


def _cause(e: BaseException) -> tuple[str, bool]:
    """The innermost reason of a connection error, and whether it dooms every request (a refused
    connection or an unknown host, as opposed to a reset or a dropped connection)."""
    chain, x = [], e.__cause__ or e.__context__
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    fatal = any(isinstance(c, (ConnectionRefusedError, socket.gaierror)) for c in chain)
    last = chain[-1] if chain else e
    text = str(last).strip()
    return (f"{type(last).__name__}: {text}" if text else type(last).__name__), fatal


class Teacher:
    """Sends one prompt's request under our retry policy and turns the answer into rows."""

    def __init__(self, cfg: TeacherSampleConfig, api_key: str | None, first_wave: int = 1, note: Callable[[str], None] = lambda _text: None) -> None:
        from openai import AsyncOpenAI

        self.cfg = cfg
        self._secret = api_key
        self.client = AsyncOpenAI(base_url=cfg.base_url, api_key=api_key or DUMMY_KEY, max_retries=0, timeout=cfg.request_timeout_s)
        self._params: dict[str, Any] = dict(model=cfg.model, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_completion_tokens=cfg.max_tokens)
        if cfg.top_logprobs is not None:
            self._params |= dict(logprobs=True, top_logprobs=cfg.top_logprobs)
        self._pause_until = 0.0  # time.monotonic() before which nobody sends (after a 429)
        self._answered = False  # the server has answered once: a later connection error is transient
        self._first_wave = max(2, first_wave)  # requests sent at once at the start (one reset alone is not fatal)
        self._early_errors = 0  # connection errors before any answer
        self.capped_waits = 0  # Retry-After values cut to retry_after_max_s
        self._note = note  # shows a pause on the progress line
        self._rng = random.Random()

    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        if self.cfg.system_prompt is not None and prompt.messages[0]["role"] != "system":
            return [{"role": "system", "content": self.cfg.system_prompt}, *prompt.messages]
        return prompt.messages

    def _backoff(self, attempt: int) -> float:
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempt - 1))
        return cap / 2 + self._rng.uniform(0, cap / 2)  # "equal jitter": spread retries, keep growth

    def _retry_after(self, headers: Any) -> float | None:
        wait = retry_after_s(headers)
        if wait is not None and wait > self.cfg.retry_after_max_s:
            self.capped_waits += 1
            return self.cfg.retry_after_max_s
        return wait

    def _fatal(self, status: int, message: str) -> EndpointError | None:
        cfg = self.cfg
        if status in (401, 403):
            why = f"${cfg.api_key_env} is not set" if not self._secret else f"check the key in ${cfg.api_key_env}"
            return EndpointError(f"the teacher at {cfg.base_url} refused the API key (HTTP {status}): {why}, or read the key from another variable with --api-key-env")
        if status == 404:
            return EndpointError(f"the teacher at {cfg.base_url} answered 404 for model {cfg.model!r} ({message}): check --model, and that --base-url is the API root (usually ending in /v1)")
        return None

    async def sample(self, prompt: Prompt) -> Outcome:
        import openai

        cfg, messages, attempt = self.cfg, self.messages(prompt), 0
        while True:
            if (wait := self._pause_until - time.monotonic()) > 0:
                await asyncio.sleep(wait)
                if time.monotonic() >= self._pause_until:
                    self._note("")
            attempt, retry_after = attempt + 1, None
            start = time.perf_counter()
            try:
                seed = {} if cfg.seed is None else {"seed": prompt_seed(cfg.seed, prompt.id)}
                resp = await self.client.chat.completions.create(messages=messages, **self._params, **seed)
                check_choices(resp, cfg.n)
                try:
                    outcome = self._outcome(prompt, messages, resp, time.perf_counter() - start, attempt)
                except (AttributeError, TypeError) as e:  # e.g. `usage` or `logprobs` of the wrong shape
                    raise _BadResponse(f"unexpected field shape ({e})") from None
                self._answered = True
                return outcome
            except openai.APIStatusError as e:
                self._answered = True
                kind, message = f"http_{e.status_code}", self.scrub(str(e.message))[:300]
                if fatal := self._fatal(e.status_code, message):
                    raise fatal from None
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    return self._failed(prompt, attempt, kind, message)
                retry_after = self._retry_after(e.response.headers)
                if e.status_code == 429 and retry_after:
                    self._pause_until = max(self._pause_until, time.monotonic() + retry_after)
                    asked = retry_after_s(e.response.headers) or retry_after
                    left = self._pause_until - time.monotonic()
                    until = time.strftime("%H:%M:%S", time.localtime(time.time() + left))
                    capped = f" (Retry-After {asked:,.0f} s capped)" if asked > retry_after else ""
                    self._note(f"HTTP 429: all paused {left:,.0f} s, until {until}{capped}")
            except openai.APITimeoutError:
                kind, message = "timeout", f"no answer within {cfg.request_timeout_s:g} s"
            except openai.APIConnectionError as e:
                cause, doomed = _cause(e)
                message = self.scrub(cause)
                if not self._answered:
                    self._early_errors += 1
                    if doomed or self._early_errors >= self._first_wave:
                        raise EndpointError(f"cannot reach the teacher at {cfg.base_url} ({message}): is the server running and --base-url right?") from None
                kind = "connection"
            except ValueError as e:  # JSON decoding, response validation, _BadResponse
                kind, message = "bad_response", f"malformed response: {self.scrub(str(e))[:300]}"
            if attempt > cfg.max_retries:
                if kind == "connection":
                    raise EndpointError(f"lost the connection to the teacher at {cfg.base_url} ({message}) after {attempt} attempts; rerun to resume")
                return self._failed(prompt, attempt, kind, f"{message} (gave up after {attempt} attempts)")
            await asyncio.sleep(retry_after if retry_after is not None else self._backoff(attempt))

    def _failed(self, prompt: Prompt, attempts: int, kind: str, message: str) -> Outcome:
        error = {"kind": kind, "message": message}
        return Outcome(rows=[], ledger={"prompt_id": prompt.id, "status": "failed", "samples": 0, "attempts": attempts, "error": error})

    def _outcome(self, prompt: Prompt, messages: list[dict[str, str]], resp: Any, latency: float, attempts: int) -> Outcome:
        """Rows for the kept choices; empty, truncated and duplicate responses are dropped and counted."""
        cfg, usage = self.cfg, resp.usage
        tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens} if usage else None
        split, dropped, seen, rows = split_of(prompt.id, cfg.split_ratios), Counter(), set(), []
        for choice in sorted(resp.choices, key=lambda c: c.index):
            text = choice.message.content or ""
            reason = "empty" if not text.strip() else "truncated" if choice.finish_reason == "length" and not cfg.keep_truncated else "duplicate" if text in seen else None
            if reason:
                dropped[reason] += 1
                continue
            seen.add(text)
            rows.append({
                "sample_id": f"{prompt.id}#{choice.index}", "prompt_id": prompt.id, "sample_index": choice.index, "split": split,
                "messages": messages, "response": text, "finish_reason": choice.finish_reason, "usage": tokens,
                "latency_s": latency, "teacher": resp.model or cfg.model, "reference": prompt.reference, "logprobs": self._logprobs(choice),
            })  # fmt: skip
        ledger = {"prompt_id": prompt.id, "status": "ok" if rows else "filtered", "samples": len(rows), "attempts": attempts, "dropped": dict(dropped), **(tokens or {})}
        return Outcome(rows=rows, ledger=ledger)

    def _logprobs(self, choice: Any) -> list[dict[str, Any]] | None:
        if self.cfg.top_logprobs is None or choice.logprobs is None or choice.logprobs.content is None:
            return None
        return [
            {"token": t.token, "logprob": t.logprob, "top_tokens": [x.token for x in t.top_logprobs], "top_logprobs": [x.logprob for x in t.top_logprobs]}
            for t in choice.logprobs.content
        ]


class Writer:
    """Commits outcomes in batches: shard, ledger, failures file, then the manifest (each atomic)."""

    def __init__(self, folder: Folder, manifest: Manifest, failures: list[dict[str, Any]], shard_size: int, interval_s: float = 60.0, retrying: dict[str, dict[str, Any]] | None = None) -> None:
        self.folder, self.manifest, self.failures, self.shard_size, self.interval_s = folder, manifest, failures, shard_size, interval_s
        self.retrying = retrying or {}  # prompt id -> its failed ledger line, for prompts asked again
        self.pending: list[Outcome] = []
        self.pending_rows = 0
        self.session: Counter[str] = Counter()  # this invocation, committed or pending
        self.next_index = 1 + max((int(f.path.rsplit("-", 1)[1].split(".")[0]) for f in manifest.files if f.path.startswith(LEDGER + "/")), default=-1)
        self._last_commit = time.monotonic()
        self._write_lock = threading.Lock()  # commits run in a worker thread and at exit
        self._async_lock: asyncio.Lock | None = None

    def add(self, outcome: Outcome) -> None:
        self.pending.append(outcome)
        self.pending_rows += len(outcome.rows)
        self.session.update(_tally(outcome.ledger))

    def _due(self) -> bool:
        full = max(len(self.pending), self.pending_rows) >= self.shard_size
        return bool(self.pending) and (full or time.monotonic() - self._last_commit >= self.interval_s)

    async def commit_if_due(self) -> None:
        """Commit in a thread so requests keep flowing; one commit at a time, in order."""
        self._async_lock = self._async_lock or asyncio.Lock()
        if not self._due():
            return
        async with self._async_lock:
            if self._due():
                batch = self._take()
                await asyncio.to_thread(self.commit, batch, False)

    def _take(self) -> list[Outcome]:
        batch, self.pending, self.pending_rows = self.pending, [], 0
        return batch

    def flush(self, complete: bool) -> None:
        self.commit(self._take(), complete)

    def commit(self, batch: list[Outcome], complete: bool) -> None:
        """Write the batch's files, then a manifest listing them; the in-memory state changes only
        once the manifest is written, so a failed commit leaves nothing listed half-done."""
        import pyarrow.parquet as pq

        with self._write_lock:
            m = self.manifest
            if not batch and m.complete == complete:
                return
            files, counts, failures = list(m.files), Counter(m.counts), self.failures
            if batch:
                part = f"part-{self.next_index:05d}"
                rows = [r for o in batch for r in o.rows]
                if rows:
                    sink = pa.BufferOutputStream()
                    pq.write_table(pa.Table.from_pylist(rows, schema=sample_schema()), sink, compression="zstd")
                    files.append(self._put(f"{SHARDS}/{part}.parquet", sink.getvalue().to_pybytes(), len(rows)))
                files.append(self._put(f"{LEDGER}/{part}.jsonl", _jsonl([o.ledger for o in batch]), len(batch)))
                again = {o.ledger["prompt_id"] for o in batch} & set(self.retrying)
                failed = [o.ledger for o in batch if o.ledger["status"] == "failed"]
                if failed or again:  # a prompt asked again replaces its old failure
                    failures = [f for f in failures if f["prompt_id"] not in again] + failed
                    files = [f for f in files if f.path != FAILURES] + [self._put(FAILURES, _jsonl(failures), len(failures))]
                for o in batch:
                    counts.update(_tally(o.ledger))
                for pid in again:
                    counts.subtract(_untally(self.retrying[pid]))
            new = m.model_copy(update={"files": files, "counts": {k: v for k, v in counts.items() if v}, "complete": complete})
            self.folder.write_manifest(new)
            self.manifest, self.failures, self.next_index = new, failures, self.next_index + bool(batch)
            self.retrying = {k: v for k, v in self.retrying.items() if k not in {o.ledger["prompt_id"] for o in batch}}
            self._last_commit = time.monotonic()

    def _put(self, rel: str, data: bytes, rows: int) -> FileEntry:
        import hashlib

        try:
            self.folder.write_bytes(rel, data)
        except OSError as e:  # the folder was writable at the start: a full disk, a remount, ...
            raise StorageError(f"cannot write {self.folder.where(rel)} ({type(e).__name__}: {e.strerror or e}); what is committed is kept: free the space and rerun to continue") from None
        return FileEntry(path=rel, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=rows)


def _tally(ledger: dict[str, Any]) -> Counter[str]:
    """Manifest/summary counters contributed by one prompt's ledger line."""
    c: Counter[str] = Counter(prompts_done=1, samples=ledger["samples"], requests=ledger["attempts"], retries=ledger["attempts"] - 1)
    c["prompt_tokens"] += ledger.get("prompt_tokens") or 0
    c["completion_tokens"] += ledger.get("completion_tokens") or 0
    for reason, k in ledger.get("dropped", {}).items():
        c[f"dropped_{reason}"] += k
    if ledger["status"] == "failed":
        c["failed"] += 1
        c[f"failed_{ledger['error']['kind']}"] += 1
    return +c


def _untally(ledger: dict[str, Any]) -> Counter[str]:
    """What a failed prompt asked again no longer counts for: it is done once, by its new line.
    Its requests and retries stay counted: they were sent (and maybe paid for)."""
    return Counter({"prompts_done": 1, "failed": 1, f"failed_{ledger['error']['kind']}": 1})


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _read_jsonl(folder: Folder, rel: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in folder.read_bytes(rel).decode("utf-8").splitlines() if line]


def _open_output(folder: Folder, fingerprint: str, config: dict[str, Any], clean: bool) -> tuple[Manifest, dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The folder's manifest (a fresh one if none), the last ledger line of every prompt already
    handled, and the failures so far. With `clean`, temporaries and files no manifest lists are
    deleted (uncommitted work)."""
    ours = lambda p: p.startswith((SHARDS + "/", LEDGER + "/")) or p == FAILURES  # noqa: E731
    folder.check_folder("--out", write=False)
    if not folder.has_manifest():
        foreign = [p for p in folder.listdir() if not ours(p) and ".tmp-" not in p]
        if foreign:
            raise InputError(f"{folder.uri} is not empty ({foreign[0]}, ...) and holds no teacher-sample manifest: choose another --out")
        if clean:
            folder.remove_temporaries()
            for p in folder.listdir():
                folder.remove(p)
        return Manifest(kind="teacher", inputs={"prompts": fingerprint}, config=config), {}, []
    m = folder.read_manifest()
    if m.kind != "teacher":
        raise InputError(f"{folder.uri} holds a {m.kind!r} artifact, not teacher samples: choose another --out")
    if m.inputs.get("prompts") != fingerprint:
        raise ConfigError(f"{folder.uri} holds samples of a different prompt set ({m.inputs.get('prompts')}, now {fingerprint}): choose another --out")
    changed = [f"{k}: {m.config.get(k)!r} there, {config[k]!r} now" for k in SAMPLING_KEYS if m.config.get(k) != config[k]]
    if changed:
        raise ConfigError(f"{folder.uri} holds samples made with other settings ({'; '.join(changed)}): choose another --out, or rerun with the same settings")
    listed = {f.path for f in m.files}
    if clean:
        folder.remove_temporaries()
        for p in folder.listdir():
            if ours(p) and p not in listed:
                folder.remove(p)
    ledger_files = sorted((f.path for f in m.files if f.path.startswith(LEDGER + "/")), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
    last = {line["prompt_id"]: line for rel in ledger_files for line in _read_jsonl(folder, rel)}  # later commits win
    failures = _read_jsonl(folder, FAILURES) if FAILURES in listed else []
    m.config = config
    return m, last, failures


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
    manifest, last, failures = _open_output(folder, fingerprint, {**cfg.model_dump(mode="json"), "seeds": SEEDS}, clean=hold is not None)
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
    teacher = Teacher(cfg, os.environ.get(cfg.api_key_env) or None, first_wave=min(cfg.concurrency, len(todo)), note=bar.note)
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
