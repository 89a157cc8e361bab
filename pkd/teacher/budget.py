"""What the teacher costs: usage sums into dollars, and an upper-bound estimate of what a set of
prompts will cost before it is sent, so that `--max-cost` can stop a run before it overspends.

The estimate counts each prompt's tokens with the tokenizer when one is given (its chat template
when it has one), else by the stated rule of one token per 4 characters of message text plus 4 per
message; completions are bounded by `max_tokens` × n. Prices are the user's (USD per 1M tokens):
batch prices differ from online ones and from provider to provider, so none is hard-coded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pkd.config import TeacherSampleConfig
from pkd.errors import BudgetError, ConfigError
from pkd.teacher.prompts import Prompt
from pkd.teacher.request import messages

CHARS_PER_TOKEN = 4  # the stated rule without a tokenizer
TOKENS_PER_MESSAGE = 4  # role and separators of one chat message


def cost(prompt_tokens: int, completion_tokens: int, cfg: TeacherSampleConfig) -> float:
    """USD for these tokens at the configured prices (0 without prices)."""
    return (prompt_tokens * (cfg.price_input or 0.0) + completion_tokens * (cfg.price_output or 0.0)) / 1e6


def token_counter(cfg: TeacherSampleConfig) -> Callable[[list[dict[str, str]]], int]:
    """Prompt tokens of one request's messages: the tokenizer's count, or the characters/4 rule."""
    if cfg.tokenizer is None:
        return lambda msgs: sum(math.ceil(len(m["content"]) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE for m in msgs)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tokenizer {cfg.tokenizer!r} cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None
    if tok.chat_template:
        return lambda msgs: len(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
    return lambda msgs: sum(len(tok.encode(m["content"], add_special_tokens=False)) + TOKENS_PER_MESSAGE for m in msgs)


@dataclass(frozen=True)
class Estimate:
    """An upper bound for sending these prompts once."""

    requests: int
    prompt_tokens: int
    completion_tokens: int  # requests × n × max_tokens
    usd: float | None  # None without prices

    def line(self) -> str:
        usd = f", at most ${self.usd:,.4f}" if self.usd is not None else ""
        return f"{self.requests:,} requests, ~{self.prompt_tokens:,} prompt tokens + at most {self.completion_tokens:,} completion tokens{usd}"


def estimate(cfg: TeacherSampleConfig, prompts: list[Prompt], count: Callable[[list[dict[str, str]]], int] | None = None) -> Estimate:
    count = count or token_counter(cfg)
    pt = sum(count(messages(cfg, p)) for p in prompts)
    ct = len(prompts) * cfg.n * cfg.max_tokens
    priced = cfg.price_input is not None and cfg.price_output is not None
    return Estimate(len(prompts), pt, ct, cost(pt, ct, cfg) if priced else None)


def spent(counts: dict[str, int], cfg: TeacherSampleConfig) -> float:
    """USD already paid for a folder, from the usage its manifest sums."""
    return cost(counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0), cfg)


class Budget:
    """The online guard: a request is sent only if what is paid, what is in flight (at its upper
    bound) and its own upper bound all fit under `max_cost`."""

    def __init__(self, cfg: TeacherSampleConfig, paid: float) -> None:
        self.cfg, self.paid, self.in_flight = cfg, paid, 0.0
        self._count = token_counter(cfg) if cfg.max_cost is not None else None
        self.stopped = False

    def reserve(self, prompt: Prompt) -> float | None:
        """The reserved upper bound, or None when the request would not fit (the run stops)."""
        if self._count is None or self.cfg.max_cost is None:
            return 0.0
        bound = estimate(self.cfg, [prompt], self._count).usd or 0.0
        if self.paid + self.in_flight + bound > self.cfg.max_cost:
            self.stopped = True
            return None
        self.in_flight += bound
        return bound

    def settle(self, reserved: float, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Replace a request's reservation by what it cost (its reservation without usage)."""
        self.in_flight -= reserved
        self.paid += reserved if prompt_tokens is None else cost(prompt_tokens, completion_tokens or 0, self.cfg)

    def error(self, what: str) -> BudgetError:
        return BudgetError(
            f"stopped before exceeding --max-cost ${self.cfg.max_cost:,.4f}: ${self.paid:,.4f} spent on this folder, {what}. "
            "Everything paid for is committed: rerun with a higher --max-cost to continue"
        )
