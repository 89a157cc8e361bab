"""All file access goes through `Folder`: one fsspec location (local path or URI such as
`s3://bucket/run`, `hf://...`, `memory://...`) with atomic writes, sha256 and manifests.

Atomicity: a file is written under a temporary name and renamed into place when complete, and
the manifest is written last, so a crash never leaves a file that looks complete and is not.
On object stores the rename is a copy, but the object only appears once fully uploaded.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, ParamSpec, TypeVar

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from pkd.errors import ManifestError, StorageError
from pkd.records import MANIFEST_NAME, Manifest, check_relative_path, dump_manifest, parse_manifest

P = ParamSpec("P")
R = TypeVar("R")
_CHUNK = 1 << 20
TMP_MARK = ".tmp-"


def storage_fs(uri: str, **storage_options: Any) -> tuple[Any, str]:
    """fsspec's (filesystem, path) for a URI; an unknown or uninstalled protocol is a StorageError."""
    try:
        return url_to_fs(uri, **storage_options)
    except ImportError:
        raise StorageError(_backend_hint(uri)) from None
    except ValueError as e:
        if "not known" in str(e):
            raise StorageError(_backend_hint(uri)) from None
        raise StorageError(f"{uri}: {e}") from None


def _backend_hint(uri: str) -> str:
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    known = known_implementations.get(protocol)
    if known is None:
        return f"unknown storage protocol {protocol!r} in {uri!r}"
    return f"{protocol}:// needs an extra package: {known.get('err') or 'see fsspec docs'}"


def backend_problem(uri: str, e: BaseException) -> StorageError | None:
    """A StorageError naming the cause when `e` is a backend's "cannot reach" or "no credentials"
    error (the Hub offline or unreachable; botocore's missing credentials under s3fs); else None."""
    names = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, ConnectionError) or "TransportError" in names:  # httpx's, under the Hub's filesystem
        hub = " (the Hugging Face Hub: check the network, HF_ENDPOINT, and that HF_HUB_OFFLINE is unset)" if uri.startswith("hf://") else " (check the network and the endpoint)"
        return StorageError(f"{uri}: cannot be reached ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}){hub}")
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return StorageError(
            f"{uri}: no usable AWS credentials ({e}). s3fs reads them through botocore from AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys), else from the profile AWS_PROFILE (default: "
            "'default') in ~/.aws/credentials or ~/.aws/config, else from the instance's IAM role; set one of these "
            "(and AWS_ENDPOINT_URL for an S3-compatible store other than AWS)"
        )
    return None


def _storage_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Backends raise their own exception types for an unreachable store or missing credentials:
    turn them into one StorageError at the Folder boundary, where the URI is known."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except Exception as e:
            problem = backend_problem(args[0].uri, e)  # type: ignore[attr-defined]
            if problem is None:
                raise
            raise problem from None

    return wrapper


class Folder:
    """A directory on any fsspec filesystem; every path argument is relative to it."""

    def __init__(self, uri: str, **storage_options: Any) -> None:
        self.uri = str(uri).rstrip("/") or "/"
        self.fs, self.root = storage_fs(self.uri, **storage_options)
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Folder({self.uri!r})"

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, check_relative_path(rel))

    @_storage_errors
    def check_folder(self, what: str, *, write: bool) -> None:
        """Fail early, naming `what` (e.g. "--out") and the cause, if this location is a file or,
        with `write`, cannot be created or written: before any paid or long work, not after."""
        try:
            if self.fs.exists(self.root) and not self.fs.isdir(self.root):
                raise StorageError(f"{what} {self.uri} is a file, not a folder: choose a folder")
            if write:
                self.fs.makedirs(self.root, exist_ok=True)
                probe = posixpath.join(self.root, f".write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}")
                with self.fs.open(probe, "wb") as f:
                    f.write(b"")
                self.fs.rm(probe)
        except OSError as e:
            raise StorageError(f"{what} {self.uri}: cannot write there ({type(e).__name__}: {e.strerror or e})") from None

    @contextmanager
    def locked(self, holder: str) -> Iterator[None]:
        """Hold an exclusive advisory lock on a local folder (flock on the directory itself, so no
        lock file to clean up, and a killed holder releases it). Other filesystems: no lock."""
        if not isinstance(self.fs, LocalFileSystem):
            yield
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageError(f"{self.uri} is in use by another running {holder}: wait for it to finish, or choose another --out") from None
            yield
        finally:
            os.close(fd)

    def where(self, rel: str) -> str:
        """Human-readable location of `rel`, for error messages."""
        return f"{self.uri}/{rel}"

    @_storage_errors
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    @_storage_errors
    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    @_storage_errors
    def listdir(self, rel: str = "") -> list[str]:
        """Relative paths of all files below `rel` (recursive)."""
        base = self.path(rel) if rel else self.root
        if not self.fs.exists(base):
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in self.fs.find(base))

    @_storage_errors
    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        try:
            return self.fs.open(self.path(rel), mode)
        except (FileNotFoundError, NotADirectoryError):
            raise StorageError(f"{self.where(rel)}: file not found") from None
        except IsADirectoryError:
            raise StorageError(f"{self.where(rel)}: is a folder, not a file") from None

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel) as f:
            return f.read()

    @contextmanager
    def atomic_open(self, rel: str) -> Iterator[IO[bytes]]:
        """Write to a temporary sibling, rename into place only if the block succeeds."""
        final = self.path(rel)
        tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.atomic_open(rel) as f:
            f.write(data)

    @_storage_errors
    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel))

    def remove_temporaries(self) -> list[str]:
        """Delete leftovers of interrupted atomic writes (never complete files)."""
        leftovers = [p for p in self.listdir() if TMP_MARK in posixpath.basename(p)]
        for p in leftovers:
            self.fs.rm(self.path(p))
        return leftovers

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.open(rel) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    # manifests -------------------------------------------------------------------------------

    def has_manifest(self) -> bool:
        return self.exists(MANIFEST_NAME)

    def read_manifest(self, model: type[Manifest] = Manifest) -> Manifest:
        if not self.exists(MANIFEST_NAME):
            self._check_reachable()
            raise ManifestError(f"{self.where(MANIFEST_NAME)}: no manifest here; is {self.uri!r} an artifact folder written by pkd?")
        text = self.read_bytes(MANIFEST_NAME).decode("utf-8", errors="replace")
        return parse_manifest(text, self.where(MANIFEST_NAME), model)

    @_storage_errors
    def _check_reachable(self) -> None:
        """Some backends answer "does not exist" for a store they cannot reach (the Hub's
        filesystem in offline mode): ask again in a way that raises the cause."""
        if isinstance(self.fs, LocalFileSystem):
            return
        try:
            self.fs.info(self.root)
        except FileNotFoundError:
            pass

    def write_manifest(self, manifest: Manifest) -> None:
        self.write_bytes(MANIFEST_NAME, dump_manifest(manifest).encode())

