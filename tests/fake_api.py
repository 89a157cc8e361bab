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

It also serves the Batch API: `/v1/files` (upload, retrieve, content) and `/v1/batches` (create,
retrieve, cancel, list with metadata). A batch runs in a thread by sending each request line
through the same chat handler (so `script` faults apply per line, a non-200 going to the error
file), and `batch_fault(index)` (index = creation order from 0) may return a `BatchFault` that
makes it fail, expire after some lines, or lose, duplicate or garble output lines, or start late.
"""

from __future__ import annotations

import email.parser
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


@dataclass
class BatchFault:
    fail: bool = False  # the batch fails before running anything (status failed, no files)
    expire_after: int | None = None  # run this many lines, then expire: the rest go to the error file
    drop: int = 0  # the first k output lines are lost
    duplicate: int = 0  # the first k output lines are written twice
    malformed: int = 0  # the last k output lines are garbage (not JSON)
    delay_s: float = 0.0  # the batch waits this long before it runs (a slow batch)


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
        batch_fault: Callable[[int], BatchFault | None] | None = None,
    ) -> None:
        self.script, self.upstream, self.delay_s, self.key, self.max_requests = script, upstream, delay_s, key, max_requests
        self.batch_fault = batch_fault
        self.files: dict[str, dict[str, Any]] = {}  # id -> file object, "data": its bytes
        self.batches: dict[str, dict[str, Any]] = {}  # id -> batch object, in creation order
        self.uploads = self.batch_calls = 0
        self.last_call = ""  # "METHOD /path" of the last Batch API call
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

            def do_GET(self) -> None:
                self._send(api._batch_api("GET", self.path, b"", {k.lower(): v for k, v in self.headers.items()}))

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if self.path.startswith(("/v1/files", "/v1/batches")):
                    return self._send(api._batch_api("POST", self.path, raw, headers))
                self._send(api._handle(json.loads(raw), headers))

            def _send(self, reply: Reply) -> None:
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

    def _batch_api(self, method: str, path: str, raw: bytes, headers: dict[str, str]) -> Reply:
        """Files and batches, enough of them for the openai client's `files` and `batches`."""
        if self.key is not None and headers.get("authorization", "") != f"Bearer {self.key}":
            return error(401, f"Incorrect API key provided: {headers.get('authorization', '')}")
        parts = path.split("?")[0].strip("/").split("/")[1:]  # without "v1"
        with self._lock:
            self.batch_calls += 1
            self.last_call = f"{method} {path.split('?')[0]}"
            if parts == ["files"] and method == "POST":
                msg = email.parser.BytesParser().parsebytes(b"Content-Type: " + headers["content-type"].encode() + b"\r\n\r\n" + raw)
                form = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
                data, name = form["file"].get_payload(decode=True), form["file"].get_filename()
                self.uploads += 1
                fid = f"file-{len(self.files)}"
                self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()), "filename": name, "purpose": form["purpose"].get_payload(), "status": "processed", "data": data}
                return Reply(200, {k: v for k, v in self.files[fid].items() if k != "data"})
            if parts[:1] == ["files"] and len(parts) >= 2:
                f = self.files.get(parts[1])
                if f is None:
                    return error(404, f"no file {parts[1]}")
                if parts[2:] == ["content"]:
                    return Reply(200, f["data"], {"Content-Type": "application/octet-stream"})
                return Reply(200, {k: v for k, v in f.items() if k != "data"})
            if parts == ["batches"] and method == "POST":
                req = json.loads(raw)
                if req["input_file_id"] not in self.files:
                    return error(400, f"no file {req['input_file_id']}")
                bid = f"batch_{len(self.batches)}"
                b = {
                    "id": bid, "object": "batch", "endpoint": req["endpoint"], "input_file_id": req["input_file_id"], "completion_window": req["completion_window"],
                    "status": "validating", "created_at": int(time.time()), "output_file_id": None, "error_file_id": None, "metadata": req.get("metadata"),
                    "request_counts": {"total": 0, "completed": 0, "failed": 0}, "errors": None,
                }  # fmt: skip
                self.batches[bid] = b
                fault = (self.batch_fault(len(self.batches) - 1) if self.batch_fault else None) or BatchFault()
                threading.Thread(target=self._run_batch, args=(b, fault, headers), daemon=True).start()
                return Reply(200, dict(b))
            if parts == ["batches"]:
                data = [dict(b) for b in reversed(self.batches.values())]
                return Reply(200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None, "has_more": False})
            if parts[:1] == ["batches"] and parts[1] in self.batches:
                b = self.batches[parts[1]]
                if parts[2:] == ["cancel"] and b["status"] not in ("completed", "failed", "expired", "cancelled"):
                    b["status"] = "cancelling"
                return Reply(200, dict(b))
        return error(404, f"unknown path {path}")

    def _run_batch(self, b: dict[str, Any], fault: BatchFault, headers: dict[str, str]) -> None:
        """Run a batch's lines through the chat handler, then publish its output and error files."""
        time.sleep(fault.delay_s)
        lines = [json.loads(x) for x in self.files[b["input_file_id"]]["data"].splitlines() if x.strip()]
        with self._lock:
            if fault.fail:
                b.update(status="failed", errors={"object": "list", "data": [{"code": "invalid_request", "message": "the fake failed this batch"}]})
                return
            b.update(status="in_progress", request_counts={"total": len(lines), "completed": 0, "failed": 0})
        out: list[bytes] = []
        err: list[bytes] = []
        status = "completed"
        for i, line in enumerate(lines):
            cid = line["custom_id"]
            if b["status"] == "cancelling" or (fault.expire_after is not None and i >= fault.expire_after):
                status = "cancelled" if b["status"] == "cancelling" else "expired"
                if status == "expired":
                    err.append(json.dumps({"id": f"req_{i}", "custom_id": cid, "response": None, "error": {"code": "batch_expired", "message": "not run in the window"}}).encode())
                continue
            reply = self._handle(line["body"], headers)
            code = 500 if reply.reset else reply.status
            body = reply.body if isinstance(reply.body, dict) else reply.body.decode("utf-8", "replace")
            record = json.dumps({"id": f"req_{i}", "custom_id": cid, "response": {"status_code": code, "request_id": f"r{i}", "body": body}, "error": None}).encode()
            (out if code == 200 else err).append(record)
            with self._lock:
                b["request_counts"]["completed" if code == 200 else "failed"] += 1
        out = out[fault.drop:]
        out = out[: fault.duplicate] + out
        if fault.malformed:
            out = out[: -fault.malformed] + [b'{"custom_id": "garbage' for _ in range(fault.malformed)]
        with self._lock:
            for kind, data in (("output_file_id", out), ("error_file_id", err)):
                if data:
                    fid = f"file-{len(self.files)}"
                    payload = b"\n".join(data) + b"\n"
                    self.files[fid] = {"id": fid, "object": "file", "bytes": len(payload), "created_at": int(time.time()), "filename": f"{b['id']}.jsonl", "purpose": "batch_output", "status": "processed", "data": payload}
                    b[kind] = fid
            b.update(status=status, completed_at=int(time.time()))

    def prompts(self) -> list[str]:
        """The last user message of every request received, in arrival order."""
        with self._lock:
            return [last_user(b) for b in self.bodies]

    def close(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()
