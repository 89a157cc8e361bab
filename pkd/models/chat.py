"""Chats as token ids for teacher-forced scoring: [prompt messages, assistant = teacher response]
rendered with the proxy's chat template, and the exact index where the response starts.

The natural tokenization of the whole rendered chat is used when it splits cleanly at the
response: the template renders the response verbatim right after the generation prompt, and the
prompt's own ids are a prefix of the whole chat's ids. Otherwise the parts are tokenized apart
and joined: prompt (with generation prompt) ids + response ids + end-of-turn ids. That happens
when a BPE merge crosses the boundary (a generation prompt ending in a space, as in Llama-2's
"[/INST] ") or when the template alters assistant content (trims it, drops reasoning): cutting
the natural ids at the first difference would score prompt tokens as response or lose response
tokens, and the cache must hold the teacher's response, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pkd.errors import InputError

# Stands in for the response to find what the template puts after it (the end of the turn):
# plain ASCII without surrounding whitespace, so that trimming or escaping templates keep it.
SENTINEL = "PKDRESPONSESENTINEL7F3A"


@dataclass(frozen=True)
class ChatIds:
    ids: list[int]  # (L,) prompt + response + end of turn
    response_start: int  # ids[response_start:] are the response and the end-of-turn tokens
    joined: bool  # True: tokenized in parts (the template's rendering did not split cleanly)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template writes its own special tokens (bos, turn markers): add none.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], response: str) -> ChatIds:
    """Ids of the chat with `response` as the assistant's turn, and where the response starts."""
    prompt = _render(tokenizer, messages, generation_prompt=True)
    full = _render(tokenizer, [*messages, {"role": "assistant", "content": response}], generation_prompt=False)
    head = _ids(tokenizer, prompt)
    if full.startswith(prompt + response):
        ids = _ids(tokenizer, full)
        if ids[: len(head)] == head:
            return ChatIds(ids, len(head), joined=False)
    marked = _render(tokenizer, [*messages, {"role": "assistant", "content": SENTINEL}], generation_prompt=False)
    if SENTINEL not in marked:
        raise InputError(
            "the proxy's chat template does not render the assistant's message content, so teacher responses cannot be "
            "placed in a chat; use a chat template that renders assistant turns"
        )
    end_of_turn = marked[marked.rindex(SENTINEL) + len(SENTINEL) :]
    return ChatIds(head + _ids(tokenizer, response) + _ids(tokenizer, end_of_turn), len(head), joined=True)
