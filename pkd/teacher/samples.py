"""Reading `pkd teacher-sample` output: the one reader every later step uses (proxy-align,
cache-logits, eval), so that they agree on what a teacher-sample folder is.

A folder holds `shards/*.parquet` (the samples), ledgers and a manifest of kind "teacher"; only
the shards carry samples. Rows stream batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pkd.errors import InputError
from pkd.fingerprint import sha256_text
from pkd.records import Manifest
from pkd.store import Folder

SHARDS_PREFIX = "shards/"
COLUMNS = ["sample_id", "prompt_id", "split", "messages", "response", "reference"]


@dataclass(frozen=True)
class TeacherSample:
    sample_id: str
    prompt_id: str
    split: str  # warmup | align | distill
    messages: list[dict[str, str]]  # the prompt as sent to the teacher
    response: str
    reference: str | None = None  # the prompt's reference answer, for exact-match evaluation


def teacher_fingerprint(manifest: Manifest) -> str:
    """Content fingerprint of a teacher-sample folder: its shards' sha256 (the ledgers only say
    which prompts were handled, not what later steps learn from)."""
    return "teacher-" + sha256_text(*sorted(f.sha256 for f in manifest.files if f.path.startswith(SHARDS_PREFIX)))


def open_teacher_samples(folder: Folder) -> Manifest:
    """The manifest of a complete teacher-sample folder; a clear error for anything else."""
    m = folder.read_manifest()
    if m.kind != "teacher":
        raise InputError(f"{folder.uri} holds a {m.kind!r} artifact, not teacher samples (the output of `pkd teacher-sample`)")
    if not m.complete:
        raise InputError(f"{folder.uri}: teacher sampling has not finished (manifest says complete=false); rerun `pkd teacher-sample` to finish it first")
    return m


def iter_teacher_samples(folder: Folder, manifest: Manifest, split: str | None = None) -> Iterator[TeacherSample]:
    """Samples in file order, shard by shard, optionally of one split only."""
    import pyarrow.parquet as pq

    for f in manifest.files:
        if not f.path.startswith(SHARDS_PREFIX):
            continue
        with folder.open(f.path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=COLUMNS):
                for row in batch.to_pylist():
                    if split is None or row["split"] == split:
                        yield TeacherSample(**row)


def count_teacher_samples(folder: Folder, manifest: Manifest, split: str | None = None) -> int:
    """Rows of one split (all rows for None), reading only the `split` column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shards = [f for f in manifest.files if f.path.startswith(SHARDS_PREFIX)]
    if split is None:
        return sum(f.rows for f in shards)
    total = 0
    for f in shards:
        with folder.open(f.path) as fh:
            total += pc.sum(pc.equal(pq.read_table(fh, columns=["split"])["split"], split)).as_py() or 0
    return total


def read_teacher_samples(folder: Folder) -> tuple[Manifest, list[TeacherSample]]:
    """All samples of a complete teacher-sample folder, in file order."""
    m = open_teacher_samples(folder)
    return m, list(iter_teacher_samples(folder, m))
