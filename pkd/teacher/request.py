"""The chat request sent for one prompt: the one place both modes (online and batch) build it, so
that a prompt asked through the Batch API gets exactly the body, seed and messages it would get
online."""

from __future__ import annotations

import hashlib
from typing import Any

from pkd.config import TeacherSampleConfig
from pkd.teacher.prompts import Prompt

SEEDS = "per prompt"  # how `seed` reaches the server (prompt_seed); a folder sampled otherwise does not resume


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The `seed` sent with one prompt's request: derived from the run's seed and the prompt id.

    Why not the run's seed itself: a server seeds each request's generator with it (vLLM does), so
    every prompt would draw the same uniform numbers and the samples would be correlated across
    prompts (in the toy demo at temperature 1, 41% of the teacher's answers came out wrong against
    28% with independent draws). Derived per prompt, draws are independent and still reproducible,
    retries and resumed runs included."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF  # a non-negative int32: every server accepts it


def messages(cfg: TeacherSampleConfig, prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as sent: the configured system prompt first, unless the prompt has its own."""
    if cfg.system_prompt is not None and prompt.messages[0]["role"] != "system":
        return [{"role": "system", "content": cfg.system_prompt}, *prompt.messages]
    return prompt.messages


def request_body(cfg: TeacherSampleConfig, prompt: Prompt) -> dict[str, Any]:
    """The `/v1/chat/completions` body for one prompt: n choices, its own seed."""
    body: dict[str, Any] = dict(model=cfg.model, messages=messages(cfg, prompt), n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_completion_tokens=cfg.max_tokens)
    if cfg.top_logprobs is not None:
        body |= dict(logprobs=True, top_logprobs=cfg.top_logprobs)
    if cfg.seed is not None:
        body["seed"] = prompt_seed(cfg.seed, prompt.id)
    return body
