"""Where models come from: a local folder, or a hub id resolved to the local HF cache. Shared
by the steps that load a proxy or student (steps never import each other)."""

from __future__ import annotations

from pathlib import Path

from pkd.errors import InputError


def local_dir(path: str | Path, marker: str, what: str) -> Path:
    """A local folder that must hold `marker` (config.json for a model, adapter_config.json for
    an adapter)."""
    p = Path(str(path).removeprefix("file://"))
    if not (p / marker).is_file():
        raise InputError(f"{what} {p} has no {marker}; pass a local {what} folder")
    return p


def resolve_model(spec: str | Path, what: str) -> Path:
    """A local model folder, or a hub id fetched to (or found in) the local HF cache."""
    text = str(spec)
    if Path(text).is_dir() or text.count("/") != 1 or text.startswith((".", "/", "~", "file://")):
        return local_dir(spec, "config.json", what)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise InputError(f"{what} {spec!r} is neither a local folder nor downloadable from the hub ({type(e).__name__}: {e})") from None
