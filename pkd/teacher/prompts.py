"""Prompt sets: JSONL, Parquet, a saved HF dataset directory or a Hub dataset id (ORG/NAME, one
split), validated into `Prompt`s.

Each record is `{"id"?, "messages": [{"role", "content"}, ...]}` or `{"id"?, "prompt": "..."}`,
with an optional `reference` answer kept for evaluation; other keys are ignored. A missing id
becomes a hash of the content, so it is stable across runs and formats. Every problem is an
`InputError` naming the file, the line (JSONL) or row (Parquet, dataset) and the field. Datasets
with other column names map them: `fields={"prompt": "question", "reference": "answer"}`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pkd.errors import ConfigError, InputError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """One validated prompt; `where` ("file:line" or "file: row N") is kept for later errors."""

    id: str
    messages: list[dict[str, str]]
    reference: str | None
    where: str


def content_id(messages: list[dict[str, str]]) -> str:
    """The id of a prompt that has none: a hash of its messages (stable across runs and formats)."""
    canonical = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return "p-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    has_messages, has_prompt = record.get("messages") is not None, record.get("prompt") is not None
    if has_messages == has_prompt:
        what = "both 'messages' and 'prompt'" if has_messages else "neither 'messages' nor 'prompt'"
        raise InputError(f"{where}: has {what}; give exactly one (a list of chat messages, or a prompt string)")
    if has_prompt:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
        return [{"role": "user", "content": prompt}]
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InputError(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content', got {m!r}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"{where}: field 'messages[{i}].role' is {role!r}; allowed roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"{where}: field 'messages[{i}].content' must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise InputError(f"{where}: field 'messages[{len(messages) - 1}].role' is {messages[-1]['role']!r}; the last message must be from the user")
    return messages


def parse_record(record: Any, where: str) -> Prompt:
    """Validate one record (a JSON object or a table row as a dict)."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    messages = _messages(record, where)
    pid = record.get("id")
    if pid is None:
        pid = content_id(messages)
    elif isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
        raise InputError(f"{where}: field 'id' must be a non-empty string or an integer, got {pid!r}")
    reference = record.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise InputError(f"{where}: field 'reference' must be a string, got {type(reference).__name__}")
    return Prompt(id=str(pid), messages=messages, reference=reference, where=where)


def _jsonl_records(path: str) -> Iterator[tuple[Any, str]]:
    import fsspec

    with fsspec.open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                msg = e.msg.removesuffix(" at")  # e.g. "Invalid control character at"
                raise InputError(f"{where}: invalid JSON ({msg} at column {e.colno})") from None


def _table_records(rows: Iterator[dict[str, Any]], path: str) -> Iterator[tuple[Any, str]]:
    for row, record in enumerate(rows):
        yield record, f"{path}: row {row}"


def _parquet_rows(path: str) -> Iterator[dict[str, Any]]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a non-Parquet file
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        for batch in pf.iter_batches(batch_size=4096):
            yield from batch.to_pylist()


def _dataset_rows(path: str) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise InputError(f"{path}: not a saved HF dataset directory ({e})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged dataset_dict.json, state.json, ...: JSONDecodeError is a ValueError
        raise InputError(f"{path}: a saved HF dataset directory that cannot be read ({type(e).__name__}: {e}); save it again with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(f"{path}: holds a DatasetDict with splits {sorted(ds)}; point at one split's directory, e.g. {path}/{sorted(ds)[0]}")
    yield from ds


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_rows(dataset_id: str, split: str) -> Iterator[dict[str, Any]]:
    """Rows of one split of a Hub dataset (datasets.load_dataset, cached by datasets)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # noqa: BLE001 - offline, gated, missing, unknown split: all "cannot load"
        raise InputError(
            f"{dataset_id}: not a local file, and the Hub dataset could not be loaded (split {split!r}; {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the id, the split (--prompts-split), the network and HF_TOKEN"
        ) from None
    yield from ds


def parse_fields(items: list[str]) -> dict[str, str]:
    """`--prompts-field FIELD=COLUMN` flags as {field: column}; a field mapped twice is refused
    rather than silently keeping one of the two columns."""
    fields: dict[str, str] = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            raise ConfigError(f"--prompts-field {item!r}: expected FIELD=COLUMN, e.g. prompt=question")
        if field in fields:
            raise ConfigError(f"--prompts-field {item!r}: {field!r} is already mapped to column {fields[field]!r}; map each field once")
        fields[field] = column
    return fields


def _mapped(records: Iterator[tuple[Any, str]], fields: Mapping[str, str]) -> Iterator[tuple[Any, str]]:
    """Rename dataset columns to pkd's fields (id, prompt, messages, reference)."""
    for record, where in records:
        if isinstance(record, dict):
            missing = [col for col in fields.values() if col not in record]
            if missing:
                raise InputError(f"{where}: no column {missing[0]!r} (mapped by --prompts-field); columns: {', '.join(sorted(record))}")
            record = {k: v for k, v in record.items() if k not in fields} | {key: record[col] for key, col in fields.items()}
        yield record, where


def load_prompts(path: str, *, split: str = "train", fields: Mapping[str, str] | None = None) -> list[Prompt]:
    """Read and validate a prompt set; duplicate ids are an error naming both places. `split`
    picks a Hub dataset's split; `fields` maps pkd's field names to the data's column names."""
    from pkd.store import storage_fs

    fs, root = storage_fs(path)
    if fs.isdir(root):
        records = _table_records(_dataset_rows(path), path)
    elif not fs.exists(root) and "://" not in path and _HUB_ID.match(path) and not path.endswith((".jsonl", ".json", ".parquet")):
        records = _table_records(_hub_rows(path, split), f"{path}[{split}]")
    elif not fs.exists(root):
        raise InputError(f"{path}: prompts file not found")
    elif path.endswith(".parquet"):
        records = _table_records(_parquet_rows(path), path)
    else:
        records = _jsonl_records(path)
    if fields:
        unknown = sorted(set(fields) - {"id", "prompt", "messages", "reference"})
        if unknown:
            raise InputError(f"--prompts-field {unknown[0]}=...: pkd's prompt fields are id, prompt, messages and reference")
        records = _mapped(records, fields)
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for record, where in records:
        p = parse_record(record, where)
        if p.id in seen:
            hint = " (identical content: give them distinct ids or drop one)" if record.get("id") is None else ""
            raise InputError(f"{where}: duplicate id {p.id!r}, first used at {seen[p.id]}{hint}")
        seen[p.id] = where
        prompts.append(p)
    if not prompts:
        raise InputError(f"{path}: no prompts (the file is empty)")
    return prompts


def prompts_fingerprint(prompts: list[Prompt]) -> str:
    """Content fingerprint of a prompt set (ids, messages, references, in order): the same for
    the same prompts whichever format or path they came from."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.messages, p.reference], ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return "prompts-" + h.hexdigest()
