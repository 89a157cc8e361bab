"""Content fingerprints: what makes two artifacts, models or tokenizers "the same" for lineage
and compatibility checks. Duck-typed so this module imports neither torch nor transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a fast tokenizer's full JSON (vocab, merges, normalizer, added tokens) and its
    chat template: two tokenizers with equal fingerprints produce the same ids for a chat."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    canonical = json.dumps(backend, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template, sort_keys=True)
    return "tok-" + sha256_text(canonical, template or "")


def files_fingerprint(root: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json", "*.jinja")) -> str:
    """Hash of the named files under `root` (relative name + content), e.g. a model's weights,
    config and adapter: any change to a weight or a setting changes it."""
    root = Path(root)
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    return "files-" + sha256_text(*(f"{p.relative_to(root).as_posix()}={sha256_file(p)}" for p in files))
