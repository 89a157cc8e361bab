"""Artifact records: the manifest model every artifact folder carries, and the logit-cache schema.

A manifest names an artifact's inputs by content fingerprint (lineage), its resolved config, its
counts and one entry per data file with its sha256. It is written last, atomically: a folder
whose manifest says `complete` holds exactly the files it lists. No torch import here, so
`pkd cache ...` starts instantly.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pkd import __version__
from pkd.errors import ManifestError

MANIFEST_NAME = "manifest.json"
LOGITS_FORMAT_VERSION = 2  # v2: entropy-coded codecs (topk v2 and v3, sampled v1); v1 (topk v1) still reads
LOGITS_FORMAT_VERSIONS = (1, 2)


def check_relative_path(path: str) -> str:
    """Reject a manifest path that could write or read outside its folder."""
    p = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or p.is_absolute()
        or any(part in ("..", "") for part in path.split("/"))
        or ":" in p.parts[0]
    ):
        raise ValueError(f"unsafe path {path!r}: manifest paths must be relative, '/'-separated and stay inside the folder")
    return path


class FileEntry(BaseModel):
    """One data file of an artifact."""

    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    rows: int = Field(ge=0)
    tokens: int = Field(default=0, ge=0)

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        return check_relative_path(v)


class SeqLogprobStats(BaseModel):
    """μ and γ of the per-sample proxy log-likelihood ℓ over the whole distillation set.

    The trainer derives the sample weight w = σ((ℓ − μ)/γ) from these, so the weighting can
    change without re-scoring."""

    model_config = ConfigDict(extra="forbid")

    reduction: Literal["mean"] = "mean"
    mu: float
    gamma: float
    count: int


class Manifest(BaseModel):
    """What every artifact folder says about itself."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["teacher", "proxy", "logits", "student", "eval"]
    format_version: int = 1
    complete: bool = False
    pkd_version: str = __version__
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    inputs: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    files: list[FileEntry] = Field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)


class LogitCacheManifest(Manifest):
    """Manifest of a logit cache: what a reader needs to decode it and check it fits a student."""

    kind: Literal["logits"] = "logits"
    format_version: int = LOGITS_FORMAT_VERSION
    codec: dict[str, Any]
    vocab_size: int = Field(gt=0)
    tokenizer_fingerprint: str
    proxy_fingerprint: str
    teacher_model: str = ""
    seq_logprob: SeqLogprobStats | None = None

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, v: int) -> int:
        if v not in LOGITS_FORMAT_VERSIONS:
            raise ValueError(f"logit-cache format v{v} is not supported (this pkd reads v{', v'.join(map(str, LOGITS_FORMAT_VERSIONS))}); upgrade pkd")
        return v


def parse_manifest(text: str, where: str, model: type[Manifest] = Manifest) -> Manifest:
    """Parse and validate manifest JSON; errors name the file and the offending field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if model is Manifest and isinstance(data, dict) and data.get("kind") == "logits":
        model = LogitCacheManifest
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())
        raise ManifestError(f"{where}: invalid manifest: {problems}") from None


def dump_manifest(manifest: Manifest) -> str:
    return manifest.model_dump_json(indent=2) + "\n"


def logit_cache_schema(codec_columns: dict[str, Any]) -> pa.Schema:
    """Arrow schema of logit-cache shards (formats v1 and v2): one row per (prompt, teacher
    response).

    T = len(input_ids) - response_start response positions; position t predicts
    input_ids[response_start + t]. The codec's `list<dtype>` columns hold the proxy's
    distribution at each position; `token_logprob` is the actual token's logprob."""
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_start", pa.int32(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("token_logprob", pa.list_(pa.float32()), nullable=False),
        pa.field("seq_logprob", pa.float64(), nullable=False),
    ]
    fields += [pa.field(name, pa.list_(pa.from_numpy_dtype(dtype)), nullable=False) for name, dtype in codec_columns.items()]
    return pa.schema(fields)
