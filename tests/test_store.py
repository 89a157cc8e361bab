import json
import uuid

import pytest

from pkd.errors import ManifestError, StorageError
from pkd.records import Manifest, parse_manifest
from pkd.store import Folder


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path) -> Folder:
    return Folder(str(tmp_path / "f") if request.param == "local" else f"memory://t-{uuid.uuid4().hex}")


def test_atomic_write_and_manifest_roundtrip(folder: Folder) -> None:
    folder.write_bytes("a/b.bin", b"hello")
    assert folder.read_bytes("a/b.bin") == b"hello"
    assert folder.listdir() == ["a/b.bin"]
    m = Manifest(kind="teacher", counts={"rows": 3})
    folder.write_manifest(m)
    assert folder.read_manifest() == m


def test_failed_write_leaves_nothing(folder: Folder) -> None:
    with pytest.raises(RuntimeError):
        with folder.atomic_open("x.bin") as f:
            f.write(b"partial")
            raise RuntimeError("crash")
    assert folder.listdir() == []


def test_remove_temporaries(folder: Folder) -> None:
    folder.write_bytes("keep.bin", b"1")
    with folder.fs.open(folder.path("x.bin.tmp-deadbeef"), "wb") as f:
        f.write(b"partial")
    assert folder.remove_temporaries() == ["x.bin.tmp-deadbeef"]
    assert folder.listdir() == ["keep.bin"]


def test_missing_backend_names_package() -> None:
    with pytest.raises(StorageError, match="gcsfs"):
        Folder("gcs://bucket/cache")


def test_unknown_protocol() -> None:
    with pytest.raises(StorageError, match="unknown storage protocol 'nope'"):
        Folder("nope://x")


def test_missing_manifest_and_file(tmp_path) -> None:
    f = Folder(str(tmp_path))
    with pytest.raises(ManifestError, match="no manifest here"):
        f.read_manifest()
    with pytest.raises(StorageError, match="file not found"):
        f.read_bytes("missing.bin")


@pytest.mark.parametrize("bad", ["../escape.parquet", "/etc/passwd", "data/../../x", "C:/x", "a\\..\\b", ""])
def test_manifest_paths_cannot_leave_folder(bad: str) -> None:
    doc = {"kind": "teacher", "files": [{"path": bad, "sha256": "0" * 64, "bytes": 1, "rows": 1}]}
    with pytest.raises(ManifestError, match="files.0.path"):
        parse_manifest(json.dumps(doc), "m.json")


def test_unsafe_relative_path_rejected_by_folder(tmp_path) -> None:
    with pytest.raises(ValueError, match="unsafe path"):
        Folder(str(tmp_path)).path("../x")


def test_manifest_not_json(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        Folder(str(tmp_path)).read_manifest()
