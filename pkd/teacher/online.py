"""The online teacher client: one chat completion per prompt asking for n choices, under our
retry policy, and the checks every answer passes (the batch mode checks its output lines with the
same `answer_outcome`).

The retry policy is ours (the openai client's is off): connection resets, timeouts, 408/409/429/5xx
and malformed responses (bad JSON, or a 200 whose `choices` are not n well-formed choices with
distinct indices in [0, n)) back off exponentially with jitter, honouring Retry-After up to
`retry_after_max_s` (a 429 pauses every worker); a prompt that still fails, or gets another 4xx,
is recorded as failed. Errors that doom every request (401/403 key, 404 model, a refused
connection, an unknown host, or connection errors on the whole first wave, at least two, before
any answer) raise `EndpointError` at once. The API key is scrubbed from every message and never stored.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pkd.config import TeacherSampleConfig
from pkd.errors import EndpointError
from pkd.teacher.prompts import Prompt
from pkd.teacher.request import request_body
from pkd.teacher.samples import Outcome
from pkd.teacher.splits import split_of

RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
# and every http_5xx; batch_* is a batch that did not deliver (pkd.teacher.batch)
TRANSIENT_KINDS = frozenset({"timeout", "bad_response", "connection", "http_408", "http_409", "http_429", "batch_expired", "batch_failed", "batch_cancelled", "batch_missing", "batch_error"})
DUMMY_KEY = "pkd-no-key"  # sent when the key variable is unset: a local server needs no auth


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


class BadResponse(ValueError):
    """A 200 whose body is not the chat completion asked for."""


def check_choices(resp: Any, n: int) -> None:
    """Refuse a 200 that is not n choices with a message each and distinct indices in [0, n):
    the client builds the object without validating it, and a wrong index would file a sample
    under another sample's id."""
    from openai.types.chat import ChatCompletion

    if not isinstance(resp, ChatCompletion):
        raise BadResponse("the body is not a JSON chat completion")
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list):
        raise BadResponse(f"'choices' is {type(choices).__name__ if choices is not None else 'missing or null'}, not a list")
    if len(choices) != n:
        raise BadResponse(f"expected {n} choices, got {len(choices)}")
    seen: set[int] = set()
    for c in choices:
        index = getattr(c, "index", None)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n or index in seen:
            raise BadResponse(f"choice index {index!r} is missing, repeated or outside [0, {n})")
        seen.add(index)
        message = getattr(c, "message", None)
        if message is None or not isinstance(getattr(message, "content", None), (str, type(None))):
            raise BadResponse(f"choice {index} has no message with text content")


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
        self._pause_until = 0.0  # time.monotonic() before which nobody sends (after a 429)
        self._answered = False  # the server has answered once: a later connection error is transient
        self._first_wave = max(2, first_wave)  # requests sent at once at the start (one reset alone is not fatal)
        self._early_errors = 0  # connection errors before any answer
        self.capped_waits = 0  # Retry-After values cut to retry_after_max_s
        self._note = note  # shows a pause on the progress line
        self._rng = random.Random()

    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

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

        cfg, body, attempt = self.cfg, request_body(self.cfg, prompt), 0
        while True:
            if (wait := self._pause_until - time.monotonic()) > 0:
                await asyncio.sleep(wait)
                if time.monotonic() >= self._pause_until:
                    self._note("")
            attempt, retry_after = attempt + 1, None
            start = time.perf_counter()
            try:
                resp = await self.client.chat.completions.create(**body)
                outcome = answer_outcome(cfg, prompt, body["messages"], resp, time.perf_counter() - start, attempt)
                self._answered = True
                return outcome
            except openai.APIStatusError as e:
                self._answered = True
                kind, message = f"http_{e.status_code}", self.scrub(str(e.message))[:300]
                if fatal := self._fatal(e.status_code, message):
                    raise fatal from None
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    return failed_outcome(prompt.id, attempt, kind, message)
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
            except ValueError as e:  # JSON decoding, response validation, BadResponse
                kind, message = "bad_response", f"malformed response: {self.scrub(str(e))[:300]}"
            if attempt > cfg.max_retries:
                if kind == "connection":
                    raise EndpointError(f"lost the connection to the teacher at {cfg.base_url} ({message}) after {attempt} attempts; rerun to resume")
                return failed_outcome(prompt.id, attempt, kind, f"{message} (gave up after {attempt} attempts)")
            await asyncio.sleep(retry_after if retry_after is not None else self._backoff(attempt))


def failed_outcome(prompt_id: str, attempts: int, kind: str, message: str) -> Outcome:
    """A prompt that failed for good: no rows, a failed ledger line with the reason."""
    error = {"kind": kind, "message": message}
    return Outcome(rows=[], ledger={"prompt_id": prompt_id, "status": "failed", "samples": 0, "attempts": attempts, "error": error})


def answer_outcome(cfg: TeacherSampleConfig, prompt: Prompt, messages: list[dict[str, str]], resp: Any, latency: float, attempts: int) -> Outcome:
    """A checked answer's outcome (both modes: the online reply, or a Batch API output line's body);
    raises `BadResponse` for anything that is not the n choices asked for."""
    check_choices(resp, cfg.n)
    try:
        return _rows(cfg, prompt, messages, resp, latency, attempts)
    except (AttributeError, TypeError) as e:  # e.g. `usage` or `logprobs` of the wrong shape
        raise BadResponse(f"unexpected field shape ({e})") from None


def _rows(cfg: TeacherSampleConfig, prompt: Prompt, messages: list[dict[str, str]], resp: Any, latency: float, attempts: int) -> Outcome:
    """Rows for the kept choices; empty, truncated and duplicate responses are dropped and counted."""
    usage = resp.usage
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
            "latency_s": latency, "teacher": resp.model or cfg.model, "reference": prompt.reference, "logprobs": _logprobs(cfg, choice),
        })  # fmt: skip
    ledger = {"prompt_id": prompt.id, "status": "ok" if rows else "filtered", "samples": len(rows), "attempts": attempts, "dropped": dict(dropped), **(tokens or {})}
    return Outcome(rows=rows, ledger=ledger)


def _logprobs(cfg: TeacherSampleConfig, choice: Any) -> list[dict[str, Any]] | None:
    if cfg.top_logprobs is None or choice.logprobs is None or choice.logprobs.content is None:
        return None
    return [
        {"token": t.token, "logprob": t.logprob, "top_tokens": [x.token for x in t.top_logprobs], "top_logprobs": [x.logprob for x in t.top_logprobs]}
        for t in choice.logprobs.content
    ]
