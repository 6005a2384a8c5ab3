"""Where stores live: URLs (`/abs/path`, `file://…`, `s3://bucket/prefix`) to fsspec filesystems and zarr stores.

S3 endpoint and credentials come from the environment only (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), never from code or configs.
Low-level storage exceptions are translated into one-line `StoreError`s by `storage_errors`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from clt_core.errors import StoreError


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URL: `protocol` is "file" or "s3"; `path` has no protocol prefix."""

    url: str
    protocol: str
    path: str

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def child(self, name: str) -> str:
        """URL of a file inside the store directory."""
        return f"{self.url.rstrip('/')}/{name}"


def parse_url(url: str) -> StoreLocation:
    """Normalise a user-given store URL; local paths become absolute."""
    if not url:
        raise StoreError("empty store URL: give a path, file://PATH or s3://BUCKET/PREFIX")
    if url.startswith("s3://"):
        path = url[len("s3://") :].strip("/")
        if not path:
            raise StoreError(f"{url}: an S3 URL needs a bucket, e.g. s3://bucket/prefix")
        return StoreLocation(url=f"s3://{path}", protocol="s3", path=path)
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        raise StoreError(f"{url}: unsupported URL scheme; use a local path, file://PATH or s3://BUCKET/PREFIX")
    path = str(Path(url).expanduser().resolve())
    return StoreLocation(url=path, protocol="file", path=path)


def s3_options() -> dict:
    """s3fs options from the environment, with short timeouts so an unreachable endpoint fails fast."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {
        "config_kwargs": {
            "connect_timeout": float(os.environ.get("CLT_S3_CONNECT_TIMEOUT", "5")),
            "read_timeout": 120,
            "retries": {"max_attempts": int(os.environ.get("CLT_S3_MAX_ATTEMPTS", "3")), "mode": "standard"},
            "max_pool_connections": 32,
        },
    }
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def filesystem(loc: StoreLocation) -> fsspec.AbstractFileSystem:
    if loc.is_local:
        return fsspec.filesystem("file")
    return fsspec.filesystem("s3", asynchronous=False, skip_instance_cache=True, **s3_options())


def zarr_store(loc: StoreLocation, read_only: bool) -> Store:
    """A zarr store for the location: `LocalStore` (atomic writes by rename) or `FsspecStore` over s3fs."""
    if loc.is_local:
        return LocalStore(loc.path, read_only=read_only)
    fs = fsspec.filesystem("s3", asynchronous=True, skip_instance_cache=True, **s3_options())
    store = FsspecStore(fs, path=loc.path, read_only=read_only)
    _close_with(store, fs)
    return store


# s3fs closes the HTTP session of a synchronous filesystem when it is collected, but not of an asynchronous one (as
# zarr needs): left open, aiohttp prints "Unclosed client session" to stderr at exit, after every `clt` command on
# S3. Close it when the zarr store is collected, and at exit before zarr stops its event loop (atexit runs in reverse
# order of registration, and zarr registered its cleanup when imported above).
_pending_closes: set[weakref.finalize] = set()
_pending_lock = threading.Lock()  # never taken inside a finalizer: GC may run one while this thread holds it


def _close_with(store: Store, fs: fsspec.AbstractFileSystem) -> None:
    fin = weakref.finalize(store, _close_s3_session, fs)
    fin.atexit = False  # run by _close_all_at_exit instead, while zarr's loop still runs
    with _pending_lock:
        _pending_closes.difference_update([f for f in _pending_closes if not f.alive])
        _pending_closes.add(fin)


def _close_s3_session(fs: fsspec.AbstractFileSystem) -> None:
    """Close an asynchronous s3fs instance's client on the zarr event loop it was opened on (best effort)."""
    from zarr.core.sync import loop as zarr_loop

    creator = getattr(fs, "_s3creator", None)
    loop = zarr_loop[0]
    if creator is None or getattr(fs, "_s3", None) is None or loop is None or not loop.is_running():
        return
    fs._s3 = None  # should anything still use this filesystem, s3fs opens a new client
    coro = creator.__aexit__(None, None, None)
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    if on_loop:  # collected on the loop's own thread: it cannot wait for itself
        loop.create_task(coro)
        return
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=5)


@atexit.register
def _close_all_at_exit() -> None:
    with _pending_lock:
        pending = list(_pending_closes)
        _pending_closes.clear()
    for fin in pending:
        fin()  # a no-op for those already run


def check_bucket(loc: StoreLocation, fs: fsspec.AbstractFileSystem) -> None:
    """Refuse a missing S3 bucket with a clear message (some servers, SeaweedFS among them, would create it on the
    first write, so a typo in the bucket name would otherwise silently scatter data into a new bucket)."""
    if loc.is_local:
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise StoreError(
            f"{loc.url}: the bucket '{bucket}' does not exist; create it first or correct the URL"
        ) from None
    except PermissionError:
        pass  # the credentials may allow objects but not the bucket; later requests will tell


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


@contextlib.contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Translate filesystem/S3 exceptions raised while doing `action` on `url` into one-line StoreErrors."""
    try:
        yield
    except StoreError:
        raise
    except PermissionError as exc:
        msg = _describe(exc)
        if "signature" in msg.lower() or "accessdenied" in msg.lower() or "forbidden" in msg.lower():
            raise StoreError(
                f"{url}: access denied while trying to {action} ({msg}); check the S3 credentials "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        raise StoreError(f"{url}: permission denied while trying to {action} ({msg})") from None
    except FileNotFoundError as exc:
        msg = _describe(exc)
        if "bucket" in msg.lower():
            raise StoreError(f"{url}: the bucket does not exist ({msg}); create it first") from None
        raise StoreError(f"{url}: not found while trying to {action} ({msg})") from None
    except OSError as exc:
        msg = _describe(exc)
        if "No space left" in msg or getattr(exc, "errno", None) == 28:
            raise StoreError(f"{url}: no space left on device while trying to {action}") from None
        raise StoreError(f"{url}: storage error while trying to {action}: {msg}") from None
    except Exception as exc:
        name = type(exc).__name__
        if "EndpointConnectionError" in name or "ConnectTimeout" in name or "ConnectionError" in name:
            endpoint = s3_options().get("endpoint_url", "the default AWS endpoint")
            raise StoreError(
                f"{url}: cannot reach the S3 endpoint {endpoint} while trying to {action}; is the server running "
                "and AWS_ENDPOINT_URL_S3 right?"
            ) from None
        if "NoCredentials" in name:
            raise StoreError(
                f"{url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        if name in {"ClientError", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            raise StoreError(f"{url}: S3 refused to {action}: {_describe(exc)}") from None
        raise
