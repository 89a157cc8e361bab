"""An OpenAI-compatible chat endpoint on 127.0.0.1 that misbehaves on purpose (tests only).

`FakeAPI(script)` serves `/v1/chat/completions` from a thread. For each request, `script(body,
attempt)` (attempt = how many times this prompt was asked, from 1) may return a `Reply` to send
instead of the canned answer; `upstream` forwards everything else to a real server instead, so the
same object also works as a counting proxy in front of vLLM. With `key`, a request without
`Authorization: Bearer <key>` gets a 401 that echoes what it sent, as real APIs do.

Fault kinds a script can return: any status with any headers (429 + Retry-After, 5xx, 4xx), a
body that is not JSON or not a chat completion (`Reply(200, b"...")`), a slow answer
(`delay_s`, for timeouts), and a connection reset with no answer at all (`Reply(reset=True)`).
The server is bounded: after `max_requests` requests or `lifetime_s` seconds it stops serving,
so a test whose client loops forever fails instead of hanging.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict[str, Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    reset: bool = False  # drop the connection with a TCP reset instead of answering


def last_user(body: dict[str, Any]) -> str:
    return body["messages"][-1]["content"]


def completion(body: dict[str, Any], texts: list[str] | None = None, finish: list[str] | None = None) -> dict[str, Any]:
    """A chat completion with n choices: given texts, or "answer i to <prompt>"."""
    n = body.get("n", 1)
    texts = texts or [f"answer {i} to {last_user(body)}" for i in range(n)]
    finish = finish or ["stop"] * n
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
    usage = {"prompt_tokens": 7, "completion_tokens": 5 * n, "total_tokens": 7 + 5 * n}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices, "usage": usage}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "fake", "code": status}}, headers or {})


class FakeAPI:
    def __init__(
        self,
        script: Callable[[dict[str, Any], int], Reply | None] | None = None,
        *,
        upstream: str | None = None,
        delay_s: float = 0.0,
        key: str | None = None,
        max_requests: int = 2000,
        lifetime_s: float = 300.0,
    ) -> None:
        self.script, self.upstream, self.delay_s, self.key, self.max_requests = script, upstream, delay_s, key, max_requests
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # lower-cased names
        self.times: list[float] = []  # time.monotonic() at arrival, parallel to bodies
        self.attempts: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = api._handle(body, {k.lower(): v for k, v in self.headers.items()})
                if reply.reset:  # SO_LINGER 0: close() sends RST, the client sees "connection reset"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.headers.pop("Content-Type", "application/json"))
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that hang up mid-request (timeouts, kill -9) are expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(lifetime_s, self.server.shutdown)
        self._timer.daemon = True
        self._timer.start()

    def _handle(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        with self._lock:
            self.bodies.append(body)
            self.headers.append(headers)
            self.times.append(time.monotonic())
            self.attempts[last_user(body)] += 1
            attempt = self.attempts[last_user(body)]
            if len(self.bodies) > self.max_requests:
                return Reply(reset=True)  # over budget: a runaway client fails, it does not hang the test
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            auth = headers.get("authorization", "")
            if self.key is not None and auth != f"Bearer {self.key}":
                return error(401, f"Incorrect API key provided: {auth}")
            reply = self.script(body, attempt) if self.script else None
            time.sleep(self.delay_s + (reply.delay_s if reply else 0.0))
            if reply is not None:
                return reply
            if self.upstream:
                import httpx

                r = httpx.post(f"{self.upstream}/chat/completions", json=body, timeout=120)
                return Reply(r.status_code, r.content)
            return Reply(200, completion(body))
        finally:
            with self._lock:
                self.in_flight -= 1

    def prompts(self) -> list[str]:
        """The last user message of every request received, in arrival order."""
        with self._lock:
            return [last_user(b) for b in self.bodies]

    def close(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()
