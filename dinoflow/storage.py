"""One small API over storage URIs: plain paths, ``file://`` and ``s3://`` (MinIO, SeaweedFS, AWS).

Why: every stage hands its outputs to the next as URIs, so any stage can run on another machine.
Two guarantees matter more than speed:

* **Atomic writes.** No reader ever sees a partial object. Local files are written to a hidden
  temporary file in the target folder, flushed, and renamed into place; S3 objects become
  visible only when their single PUT or multipart upload completes, and a failed stream is
  aborted rather than committed.
* **Bounded retries.** Transient errors (connection refused or reset, time-outs, 5xx, SlowDown)
  are retried with exponential backoff within a wall-clock budget; the final error names the
  operation, the URI, the attempts made and the cause. Missing objects and denied access fail at
  once.

The S3 endpoint and credentials come from the standard variables (``AWS_ENDPOINT_URL`` or
``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...) through
:meth:`S3Settings.from_env`, called at the edge (CLI, components), never inside library code.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dinoflow.progress import progress

PARTIAL_MARKER = ".partial-"
IDENTITY_FILE = "identity.json"
_T = TypeVar("_T")

_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
}
_TRANSIENT_S3_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "500",
    "502",
    "503",
    "504",
}
_TRANSIENT_TYPE_NAMES = {
    # botocore / aiohttp / fsspec classes, matched by name so none of them must be importable
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "HTTPClientError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "FSTimeoutError",
    "IncompleteRead",
    "ResponseParserError",
}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class StorageError(OSError):
    """A storage operation that failed for good; the message names the URI and the cause."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by attempts and by a wall-clock budget."""

    attempts: int = 6
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0
    budget_s: float = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class S3Settings:
    """Endpoint and credentials of an S3-compatible store; None means botocore's defaults."""

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> S3Settings:
        """Read the standard AWS/MLflow variables (AWS_ENDPOINT_URL wins over MLflow's)."""
        return cls(
            endpoint_url=environ.get("AWS_ENDPOINT_URL_S3")
            or environ.get("AWS_ENDPOINT_URL")
            or environ.get("MLFLOW_S3_ENDPOINT_URL"),
            access_key=environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=environ.get("AWS_SECRET_ACCESS_KEY"),
            session_token=environ.get("AWS_SESSION_TOKEN"),
            region=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"),
        )


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: network trouble, time-outs, throttling, server 5xx."""
    if isinstance(err, _PERMANENT):
        return False
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_TYPE_NAMES for cls in type(current).__mro__):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, Mapping):
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _TRANSIENT_S3_CODES or status in _TRANSIENT_S3_CODES:
                return True
        current = current.__cause__ or current.__context__
    return False


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI or path with single slashes."""
    joined = base.rstrip("/")
    for part in parts:
        joined = f"{joined}/{part.strip('/')}"
    return joined


def basename(uri: str) -> str:
    """The last part of a URI or path (``s3://bucket/runs/demo/`` -> ``demo``), a trailing ``/``
    ignored: storage reads ``a/b/`` as ``a/b``, and ``os.path.basename`` would give ``""``."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _walk_local(path: str) -> list[str]:
    """Every file under the local ``path`` (``path`` itself if a file), following links to folders:
    a data set staged as links to its class folders is listed whole (fsspec's ``find`` lists such a
    link as one file), each real folder once, so a link back up the tree cannot loop."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(path)
    seen: set[str] = set()
    found = []
    for folder, folders, files in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        found.extend(os.path.join(folder, name) for name in files)
    return found


def _is_partial(path: str) -> bool:
    return PARTIAL_MARKER in basename(path)


class Storage:
    """Read, write, list and delete objects by URI; writes are atomic, errors retried.

    Example::

        storage = Storage(S3Settings.from_env(os.environ))
        storage.write_bytes("s3://runs/demo/summary.json", b"{}")
        storage.upload_dir("checkpoints/", "s3://runs/demo/checkpoints")
    """

    def __init__(
        self,
        s3: S3Settings | None = None,
        retry: RetryPolicy | None = None,
        part_size: int = 8 << 20,
    ) -> None:
        if part_size < 5 << 20:
            raise ValueError(f"part_size must be >= 5 MiB (S3's multipart minimum), got {part_size}")
        self.s3 = s3 or S3Settings()
        self.retry = retry or RetryPolicy()
        self.part_size = part_size
        self._local = LocalFileSystem()
        self._s3fs: Any = None

    # -- plumbing ---------------------------------------------------------------------------

    def _s3(self) -> Any:
        if self._s3fs is None:
            fs = fsspec.filesystem(
                "s3",
                endpoint_url=self.s3.endpoint_url,
                key=self.s3.access_key,
                secret=self.s3.secret_key,
                token=self.s3.session_token,
                client_kwargs={"region_name": self.s3.region or "us-east-1"},
                config_kwargs={
                    # one attempt per call: retries are ours, so their budget is bounded
                    "retries": {"max_attempts": 1, "mode": "standard"},
                    "connect_timeout": self.s3.connect_timeout_s,
                    "read_timeout": self.s3.read_timeout_s,
                },
                skip_instance_cache=True,
                use_listings_cache=False,
            )
            fs.retries = 1
            self._s3fs = fs
        return self._s3fs

    def _resolve(self, uri: str) -> tuple[str, str]:
        """Split a URI into ('local' | 's3', path without the scheme)."""
        uri = str(uri)
        if uri.startswith("s3://"):
            path = uri[len("s3://") :].rstrip("/")
            if not path:
                raise StorageError(f"{uri!r} names no bucket")
            return "s3", path
        if uri.startswith("file://"):
            return "local", os.path.abspath(uri[len("file://") :])
        if "://" in uri:
            scheme = uri.split("://", 1)[0]
            raise StorageError(f"unsupported scheme {scheme!r} in {uri!r}; allowed: path, file://, s3://")
        return "local", os.path.abspath(uri)

    def _call(self, op: str, uri: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` with retries on transient errors, within the policy's budget."""
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified below, re-raised with context
                elapsed = time.monotonic() - start
                if isinstance(err, FileNotFoundError):
                    raise FileNotFoundError(f"{op} {uri}: not found") from err
                if not is_transient(err):
                    raise StorageError(f"{op} {uri} failed: {type(err).__name__}: {err}") from err
                delay = self.retry.delay(attempt)
                if attempt >= self.retry.attempts or elapsed + delay > self.retry.budget_s:
                    raise StorageError(
                        f"{op} {uri} failed after {attempt} attempts in {elapsed:.1f}s "
                        f"(retry budget {self.retry.budget_s:.0f}s): {type(err).__name__}: {err}"
                    ) from err
                time.sleep(delay)

    @staticmethod
    def _local_temp(path: str) -> str:
        folder, name = os.path.split(path)
        return os.path.join(folder, f".{name}{PARTIAL_MARKER}{uuid.uuid4().hex[:12]}")

    def _local_atomic_write(self, path: str, write: Callable[[Any], None]) -> None:
        """Write through ``write(fileobj)`` into a hidden temp file, fsync, rename into place."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        temp = self._local_temp(path)
        try:
            with open(temp, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            if os.path.exists(temp):
                os.remove(temp)
            raise

    # -- reading ----------------------------------------------------------------------------

    def read_bytes(self, uri: str) -> bytes:
        """The whole object."""
        kind, path = self._resolve(uri)
        if kind == "local":
            return self._call("read", uri, lambda: Path(path).read_bytes())
        return self._call("read", uri, lambda: self._s3().cat_file(path))

    def read_range(self, uri: str, start: int, size: int) -> bytes:
        """``size`` bytes of the object from byte ``start``, a position inside it (fewer at its end):
        one tar member of a shard without the rest of it (an S3 ranged GET)."""
        if start < 0 or size < 0:
            raise ValueError(f"read_range of {uri}: start {start} and size {size} must be >= 0")
        if size == 0:
            return b""
        kind, path = self._resolve(uri)
        if kind == "local":
            def local() -> bytes:
                with open(path, "rb") as handle:
                    handle.seek(start)
                    return handle.read(size)

            return self._call("read", uri, local)
        return self._call("read", uri, lambda: self._s3().cat_file(path, start=start, end=start + size))

    def exists(self, uri: str) -> bool:
        """Whether an object (or a non-empty prefix / folder) is at ``uri``."""
        kind, path = self._resolve(uri)
        if kind == "local":
            return os.path.exists(path)

        def probe() -> bool:
            try:
                self._s3().info(path)
            except FileNotFoundError:
                return False
            return True

        return self._call("exists", uri, probe)

    def size(self, uri: str) -> int:
        """Size of an object in bytes."""
        kind, path = self._resolve(uri)
        fs = self._local if kind == "local" else self._s3()
        return int(self._call("size", uri, lambda: fs.info(path)["size"]))

    def list(self, uri: str, recursive: bool = False) -> list[str]:
        """URIs under ``uri`` (children, or every file when recursive), sorted; [] if none.

        Temporary files of writes in progress are never listed.
        """
        kind, path = self._resolve(uri)
        fs = self._local if kind == "local" else self._s3()

        def listing() -> list[str]:
            try:
                if recursive and kind == "local":
                    return _walk_local(path)
                found = fs.find(path) if recursive else fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return found

        found = self._call("list", uri, listing)
        root = path.rstrip("/")
        children = []
        for item in found:
            item = item.rstrip("/")
            if item == root or _is_partial(item):
                continue
            children.append(join_uri(uri, item[len(root) + 1 :]))
        return sorted(children)

    def get_file(self, uri: str, local_path: str | Path) -> Path:
        """Download an object to a local file, atomically."""
        kind, path = self._resolve(uri)
        target = os.path.abspath(local_path)
        if kind == "local":
            self._call("get", uri, lambda: self._local_atomic_write(target, lambda h: _copy_into(path, h)))
        else:

            def download() -> None:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                temp = self._local_temp(target)
                try:
                    self._s3().get_file(path, temp)
                    os.replace(temp, target)
                finally:
                    if os.path.exists(temp):
                        os.remove(temp)

            self._call("get", uri, download)
        return Path(target)

    # -- writing ----------------------------------------------------------------------------

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object atomically."""
        self.write_stream(uri, lambda: [data])

    def write_stream(self, uri: str, chunks: Callable[[], Iterable[bytes]]) -> None:
        """Write the chunks of ``chunks()`` as one object, atomically.

        ``chunks`` is a factory so that a write interrupted by a transient error can be redone
        from the start; nothing of an interrupted write ever becomes visible.
        """
        kind, path = self._resolve(uri)
        if kind == "local":

            def write_local() -> None:
                def body(handle: Any) -> None:
                    for chunk in chunks():
                        handle.write(chunk)

                self._local_atomic_write(path, body)

            self._call("write", uri, write_local)
            return

        def write_s3() -> None:
            handle = self._s3().open(path, "wb", block_size=self.part_size)
            try:
                for chunk in chunks():
                    handle.write(chunk)
            except BaseException:
                _abandon(handle)
                raise
            handle.close()

        self._call("write", uri, write_s3)

    def put_file(self, local_path: str | Path, uri: str) -> None:
        """Upload a local file atomically (multipart above the part size on S3)."""
        source = os.fspath(local_path)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"put {uri}: local file {source} does not exist")
        kind, path = self._resolve(uri)
        if kind == "local":
            self._call("put", uri, lambda: self._local_atomic_write(path, lambda h: _copy_into(source, h)))
        else:
            self._call("put", uri, lambda: self._s3().put_file(source, path, chunksize=self.part_size))

    def delete(self, uri: str, recursive: bool = False) -> None:
        """Remove an object (or everything under a prefix when recursive); missing is fine."""
        kind, path = self._resolve(uri)
        fs = self._local if kind == "local" else self._s3()

        def remove() -> None:
            try:
                fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._call("delete", uri, remove)

    def make_bucket(self, uri: str) -> None:
        """Create the bucket of an ``s3://`` URI if it does not exist (no-op for local paths)."""
        kind, path = self._resolve(uri)
        if kind == "local":
            return
        bucket = path.split("/", 1)[0]
        fs = self._s3()

        def create() -> None:
            if not fs.exists(bucket):
                fs.mkdir(bucket)

        self._call("make_bucket", f"s3://{bucket}", create)

    # -- folders ----------------------------------------------------------------------------

    def upload_dir(self, local_dir: str | Path, uri: str) -> list[str]:
        """Copy every file under a local folder to ``uri``, each atomically; returns the URIs."""
        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"upload to {uri}: {root} is not a folder")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        written = []
        for file in progress(files, desc=f"upload {root.name}", unit="file"):
            target = join_uri(uri, file.relative_to(root).as_posix())
            self.put_file(file, target)
            written.append(target)
        return written

    def download_dir(self, uri: str, local_dir: str | Path) -> list[Path]:
        """Copy every object under ``uri`` into a local folder, each atomically."""
        sources = self.list(uri, recursive=True)
        if not sources:
            raise FileNotFoundError(f"download {uri}: nothing there")
        prefix = uri.rstrip("/") + "/"
        written = []
        for source in progress(sources, desc=f"download {uri}", unit="file"):
            relative = source[len(prefix) :]
            if ".." in Path(relative).parts:
                raise StorageError(f"download {uri}: refusing key {relative!r} that leaves the folder")
            written.append(self.get_file(source, Path(local_dir) / relative))
        return written


def claim(storage: Storage, uri: str, identity: Mapping[str, Any], what: str, file: str = IDENTITY_FILE) -> None:
    """Write ``<uri>/<file>`` (``identity`` as JSON, atomically), or check that the one there is
    ``identity``. Why: a folder of saved work (feature parts, a head's saves, embeddings) is resumed
    only by the same work; one holding ``what`` (another's) is refused, naming where they differ,
    nothing in it touched."""
    path = join_uri(uri, file)
    wanted = json.loads(json.dumps(identity))
    if storage.exists(path):
        found = json.loads(storage.read_bytes(path))
        if found != wanted:
            raise ValueError(f"{uri} holds {what} (it differs in {_differences(found, wanted)}): "
                             "give another output folder, or delete this one to start over")
        return
    storage.write_bytes(path, json.dumps(wanted, indent=2, sort_keys=True).encode())


SHOWN_TEXT = 40  # the longest text a difference shows; a longer one (a URI, a listing) is named alone


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """The keys where ``found`` and ``wanted`` differ (one lacking a key differs), sorted; with both
    values where both are short, ``load_size (48 there, 40 here)``, ``dtype ('float16' there,
    'float32' here)``; by name alone a digest (``*_sha256``), a long text, a list or a table, too
    long to read in one line."""
    differ = sorted(k for k in found.keys() | wanted.keys()
                    if k not in found or k not in wanted or found[k] != wanted[k])

    def short(value: Any) -> bool:
        return value is None or isinstance(value, (bool, int, float)) or (
            isinstance(value, str) and len(value) <= SHOWN_TEXT)

    def said(side: Mapping[str, Any], key: str) -> str:
        return repr(side[key]) if key in side else "absent"

    def named(key: str) -> str:
        there, here = found.get(key), wanted.get(key)
        if key.endswith("_sha256") or not (short(there) and short(here)):
            return key
        return f"{key} ({said(found, key)} there, {said(wanted, key)} here)"

    return ", ".join(map(named, differ))


def _abandon(handle: Any) -> None:
    """Drop an unfinished S3 upload: abort its multipart part list, never commit it."""
    try:
        handle.discard()
    except Exception:  # noqa: BLE001 - the server may be gone; the upload then expires there
        pass
    handle.closed = True  # keeps fsspec's __del__ from flushing (committing) the buffer


def _copy_into(source: str, handle: Any, chunk_size: int = 8 << 20) -> None:
    with open(source, "rb") as src:
        while chunk := src.read(chunk_size):
            handle.write(chunk)
