"""The Batch API client: the online mode's requests, sent as Batch API JSONL files at the batch
price, collected into the same shards exactly once, over a process that may run for a day.

Everything the client learns is recorded in `batch/state.json` in the output folder, atomically,
before and after each call: a part's request file and its sha256 before the upload, the file id
after it, "submitting" before `batches.create`, the batch id after it. Each batch carries metadata
naming the run and the part, so a batch submitted by a process killed before it recorded the id
is found again (`batches.list`) instead of submitted twice. Rerunning the same command polls the
recorded batches, downloads their output and error files into `batch/`, and commits each answer
through the folder's Writer: a prompt's answer is committed only while no ledger line names it
(or names it failed), so collecting a part twice after `kill -9` adds nothing.

Output lines are read in OpenAI's format, which `vllm run-batch` also writes: `custom_id`,
`response.status_code`, `response.body` (a chat completion) or `error`. A line for an unknown id,
a second line for the same id, and a line that is not JSON are counted and reported; a prompt
with no usable line gets a failed ledger line whose kind says why (`batch_expired`,
`batch_failed`, `batch_cancelled`, `batch_missing`, `http_<status>`, `bad_response`), which
`--retry-failed` requests again.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from pkd.config import TeacherSampleConfig
from pkd.errors import ConfigError, EndpointError, InputError
from pkd.store import Folder
from pkd.teacher.online import DUMMY_KEY, BadResponse, answer_outcome, failed_outcome
from pkd.teacher.prompts import Prompt
from pkd.teacher.request import request_body
from pkd.teacher.samples import Outcome

STATE = "batch/state.json"
ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def request_line(cfg: TeacherSampleConfig, prompt: Prompt) -> bytes:
    """One Batch API request: the online mode's body, `custom_id` = the prompt id."""
    line = {"custom_id": prompt.id, "method": "POST", "url": ENDPOINT, "body": request_body(cfg, prompt)}
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")


def split_requests(cfg: TeacherSampleConfig, prompts: list[Prompt]) -> list[tuple[list[str], bytes]]:
    """Request files within the provider's limits: (prompt ids, file bytes) each."""
    files: list[tuple[list[str], bytes]] = []
    ids: list[str] = []
    buf: list[bytes] = []
    size = 0
    for p in prompts:
        line = request_line(cfg, p)
        if len(line) > cfg.batch_max_bytes:
            raise ConfigError(f"prompt {p.id!r}: its request alone is {len(line):,} bytes, over --batch-max-bytes {cfg.batch_max_bytes:,}")
        if ids and (len(ids) >= cfg.batch_max_requests or size + len(line) > cfg.batch_max_bytes):
            files.append((ids, b"".join(buf)))
            ids, buf, size = [], [], 0
        ids.append(p.id)
        buf.append(line)
        size += len(line)
    if ids:
        files.append((ids, b"".join(buf)))
    return files


@dataclass
class Part:
    """One request file and what became of it."""

    name: str  # batch/<name>.jsonl holds its requests
    prompts: list[str]
    sha256: str
    file_id: str | None = None
    batch_id: str | None = None
    status: str = "written"  # written | uploaded | submitting | the batch's status
    counts: dict[str, int] = field(default_factory=dict)  # the batch's request_counts
    submitted_at: float | None = None
    collected: bool = False


@dataclass
class State:
    run: str  # names the folder's batches in their metadata
    parts: list[Part] = field(default_factory=list)

    def pending(self) -> list[Part]:
        return [p for p in self.parts if not p.collected]


def load_state(folder: Folder) -> State:
    if not folder.exists(STATE):
        return State(run=uuid.uuid4().hex)
    raw = json.loads(folder.read_bytes(STATE))
    return State(run=raw["run"], parts=[Part(**p) for p in raw["parts"]])


def save_state(folder: Folder, state: State) -> None:
    folder.write_bytes(STATE, json.dumps(asdict(state), indent=1).encode())


@dataclass(frozen=True)
class Parsed:
    """A Batch API output (and error) file, read: the first line per custom id, and what was odd."""

    lines: dict[str, dict[str, Any]]
    malformed: int = 0
    duplicates: int = 0


def parse_output(data: list[bytes]) -> Parsed:
    lines: dict[str, dict[str, Any]] = {}
    malformed = duplicates = 0
    for blob in data:
        for raw in blob.splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                cid = line["custom_id"]
                if not isinstance(cid, str):
                    raise TypeError(cid)
            except (ValueError, KeyError, TypeError):
                malformed += 1
                continue
            if cid in lines:
                duplicates += 1
                continue
            lines[cid] = line
    return Parsed(lines, malformed, duplicates)


def line_outcome(cfg: TeacherSampleConfig, prompt: Prompt, line: dict[str, Any]) -> Outcome:
    """One prompt's outcome from its output line: the answer, or a failure with the reason."""
    from openai.types.chat import ChatCompletion
    from pydantic import ValidationError

    response, error = line.get("response") or {}, line.get("error")
    status = response.get("status_code") if isinstance(response, dict) else None
    if status != 200:
        detail = error or (response.get("body") if isinstance(response, dict) else None)
        code = error.get("code") if isinstance(error, dict) else None
        kind = f"http_{status}" if isinstance(status, int) else code if isinstance(code, str) and code.startswith("batch_") else "batch_error"
        return failed_outcome(prompt.id, 1, kind, f"batch line: {json.dumps(detail)[:300]}")
    try:
        resp = ChatCompletion.model_validate(response.get("body"))
        return answer_outcome(cfg, prompt, request_body(cfg, prompt)["messages"], resp, 0.0, 1)
    except (ValidationError, BadResponse) as e:
        return failed_outcome(prompt.id, 1, "bad_response", f"malformed batch answer: {str(e)[:300]}")


class Collector:
    """Turns output lines into outcomes, each prompt at most once per folder: a prompt is taken
    while no ledger line names it or its line says failed (a retry's answer replaces that)."""

    def __init__(self, cfg: TeacherSampleConfig, prompts: list[Prompt], last: dict[str, dict[str, Any]], add: Callable[[Outcome, dict[str, Any] | None], None]) -> None:
        self.cfg, self.by_id, self.last, self.add = cfg, {p.id: p for p in prompts}, last, add  # last: each prompt's last ledger line
        self.stats: Counter[str] = Counter()

    def take(self, parsed: Parsed, ids: list[str], missing_kind: str | None) -> None:
        """Commit the answers for `ids`; with `missing_kind`, an id without a line fails with it."""
        self.stats.update(malformed_lines=parsed.malformed, duplicate_lines=parsed.duplicates)
        self.stats["unknown_lines"] += sum(1 for cid in parsed.lines if cid not in self.by_id)
        for pid in ids:
            if pid not in self.by_id:
                continue
            line = parsed.lines.get(pid)
            if line is not None:
                outcome = line_outcome(self.cfg, self.by_id[pid], line)
            elif missing_kind is not None:
                odd = f" ({parsed.malformed} malformed lines in this batch's output)" if parsed.malformed else ""
                outcome = failed_outcome(pid, 1, missing_kind, f"no output line for this request{odd}")
            else:
                continue
            before = self.last.get(pid)
            if before is not None and (before["status"] != "failed" or outcome.ledger["status"] == "failed"):
                self.stats["already_committed"] += 1
                continue
            self.add(outcome, before)
            self.last[pid] = outcome.ledger


class BatchClient:
    """Submits, finds, polls and downloads one folder's batches; records each step in the state."""

    def __init__(self, cfg: TeacherSampleConfig, folder: Folder, state: State, api_key: str | None) -> None:
        from openai import OpenAI

        self.cfg, self.folder, self.state, self._secret = cfg, folder, state, api_key
        self.client = OpenAI(base_url=cfg.base_url, api_key=api_key or DUMMY_KEY, max_retries=cfg.max_retries, timeout=cfg.request_timeout_s)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """One API call; errors become one line (the key scrubbed), committed work is kept."""
        import openai

        try:
            return fn()
        except openai.APIStatusError as e:
            message = str(e.message).replace(self._secret, "***") if self._secret else str(e.message)
            raise EndpointError(f"{what} at {self.cfg.base_url} failed (HTTP {e.status_code}: {message[:300]}); everything recorded is kept in {self.folder.where(STATE)}: rerun to continue") from None
        except openai.APIConnectionError:
            raise EndpointError(f"cannot reach the batch API at {self.cfg.base_url} ({what}); everything recorded is kept: rerun to continue") from None

    def save(self) -> None:
        save_state(self.folder, self.state)

    def add_parts(self, prompts: list[Prompt]) -> list[Part]:
        """Write the request files and record them (before anything is sent)."""
        start = 1 + max((int(p.name.rsplit("-", 1)[1]) for p in self.state.parts), default=-1)
        parts = []
        for i, (ids, data) in enumerate(split_requests(self.cfg, prompts)):
            part = Part(name=f"requests-{start + i:05d}", prompts=ids, sha256=hashlib.sha256(data).hexdigest())
            self.folder.write_bytes(f"batch/{part.name}.jsonl", data)
            parts.append(part)
        self.state.parts += parts
        self.save()
        return parts

    def _find(self, part: Part) -> Any | None:
        """The batch a killed run submitted for this part and did not record, if any."""
        for b in self._call("listing batches", lambda: list(self.client.batches.list(limit=100))):
            meta = b.metadata or {}
            if meta.get("pkd_run") == self.state.run and meta.get("pkd_part") == part.name:
                return b
        return None

    def submit(self, part: Part) -> None:
        if part.batch_id is not None:
            return
        if part.status == "submitting" and (found := self._find(part)) is not None:
            part.batch_id, part.status = found.id, found.status
            self.save()
            return
        if part.file_id is None:
            data = self.folder.read_bytes(f"batch/{part.name}.jsonl")
            if hashlib.sha256(data).hexdigest() != part.sha256:
                raise InputError(f"{self.folder.where(f'batch/{part.name}.jsonl')} changed since it was written (sha256 differs from {STATE}): restore it or start another --out")
            f = self._call("uploading a batch file", lambda: self.client.files.create(file=(f"{part.name}.jsonl", data), purpose="batch"))
            part.file_id, part.status = f.id, "uploaded"
            self.save()
        part.status, part.submitted_at = "submitting", time.time()
        self.save()
        meta = {"pkd_run": self.state.run, "pkd_part": part.name}
        once = self.client.with_options(max_retries=0)  # a retried create could submit twice; a rerun looks for it instead
        b = self._call("creating a batch", lambda: once.batches.create(input_file_id=part.file_id, endpoint=ENDPOINT, completion_window=self.cfg.completion_window, metadata=meta))
        part.batch_id, part.status = b.id, b.status
        self.save()

    def poll(self, part: Part) -> Any:
        b = self._call("looking at a batch", lambda: self.client.batches.retrieve(part.batch_id))
        rc = b.request_counts
        counts = {"total": rc.total, "completed": rc.completed, "failed": rc.failed} if rc else {}
        if (b.status, counts) != (part.status, part.counts):
            part.status, part.counts = b.status, counts
            self.save()
        return b

    def download(self, part: Part, batch: Any) -> list[bytes]:
        """The batch's output and error files, kept in batch/ beside the requests."""
        data = []
        for kind, fid in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
            if fid:
                rel = f"batch/{part.name}.{kind}.jsonl"
                if not self.folder.exists(rel):
                    self.folder.write_bytes(rel, self._call(f"downloading the {kind} file", lambda fid=fid: self.client.files.content(fid).content))
                data.append(self.folder.read_bytes(rel))
        return data

    def close(self) -> None:
        self.client.close()


def progress_line(parts: list[Part], now: float) -> str:
    """Per batch: status, completed/failed counts, elapsed."""
    out = []
    for p in parts:
        c = p.counts
        elapsed = f"{(now - p.submitted_at) / 60:.1f} min" if p.submitted_at else "-"
        out.append(f"{p.name} {p.batch_id or '-'}: {p.status} {c.get('completed', 0)}/{c.get('total', len(p.prompts))} done, {c.get('failed', 0)} failed, {elapsed}")
    return "; ".join(out)


def run_batches(client: BatchClient, collector: Collector, *, wait: bool, say: Callable[[str], None], commit: Callable[[], None]) -> list[Part]:
    """Submit every part not yet submitted, then poll and collect until every part is collected
    (or, without `wait`, look once). Returns the parts still pending."""
    state = client.state
    for part in state.pending():
        client.submit(part)
    while True:
        for part in state.pending():
            batch = client.poll(part)
            if batch.status in TERMINAL:
                missing = "batch_missing" if batch.status == "completed" else f"batch_{batch.status}"
                collector.take(parse_output(client.download(part, batch)), part.prompts, missing)
                commit()
                part.collected = True
                client.save()
        pending = state.pending()
        if pending:
            say(progress_line(pending, time.time()))
        if not pending or not wait:
            return pending
        time.sleep(client.cfg.poll_interval_s)


def read_outputs(paths: list[str]) -> Iterator[bytes]:
    """Files given to --from-batch-output, each read whole (local paths or fsspec URIs)."""
    import fsspec

    for p in paths:
        try:
            with fsspec.open(p, "rb") as f:
                yield f.read()
        except (OSError, ValueError) as e:
            raise InputError(f"--from-batch-output {p}: cannot be read ({type(e).__name__}: {e})") from None
