"""Where stores live: URLs (`/abs/path`, `file://…`, `s3://bucket/prefix`) to fsspec filesystems and zarr stores.

S3 endpoint and credentials come from the environment only (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), never from code or configs.
Low-level storage exceptions are translated into one-line `StoreError`s by `storage_errors`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import threading
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
    """s3fs options from the environment, with short timeouts so an unreachable endpoint fails fast.

    Credentials set in the environment are passed explicitly so that they are part of the filesystem cache key:
    changing them (another user, a rotated secret) gives a new client rather than a stale cached one. Unset, s3fs
    falls back to botocore's usual chain (profiles, instance roles)."""
    env = os.environ
    options: dict = {
        "config_kwargs": {
            "connect_timeout": float(env.get("CLT_S3_CONNECT_TIMEOUT", "5")),
            "read_timeout": 120,
            "retries": {"max_attempts": int(env.get("CLT_S3_MAX_ATTEMPTS", "3")), "mode": "standard"},
            "max_pool_connections": 32,
        },
    }
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    for option, var in (
        ("key", "AWS_ACCESS_KEY_ID"),
        ("secret", "AWS_SECRET_ACCESS_KEY"),
        ("token", "AWS_SESSION_TOKEN"),
    ):
        if env.get(var):
            options[option] = env[var]
    return options


def filesystem(loc: StoreLocation) -> fsspec.AbstractFileSystem:
    """A synchronous filesystem for the location (cached by fsspec per set of options)."""
    if loc.is_local:
        return fsspec.filesystem("file")
    return fsspec.filesystem("s3", **s3_options())


# One asynchronous s3fs client per set of options for the whole process, used by every zarr store on S3 (zarr runs
# all of them on its one event loop). s3fs never closes the HTTP session of an asynchronous filesystem, and aiohttp
# then prints "Unclosed client session" at exit: close them at exit, before zarr stops its loop (atexit runs in
# reverse order of registration, and zarr registered its cleanup when imported above).
_async_filesystems: dict[str, fsspec.AbstractFileSystem] = {}
_async_lock = threading.Lock()


def _async_s3() -> fsspec.AbstractFileSystem:
    options = s3_options()
    key = json.dumps(options, sort_keys=True)
    with _async_lock:
        if key not in _async_filesystems:
            _async_filesystems[key] = fsspec.filesystem("s3", asynchronous=True, skip_instance_cache=True, **options)
        return _async_filesystems[key]


def zarr_store(loc: StoreLocation, read_only: bool) -> Store:
    """A zarr store for the location: `LocalStore` (atomic writes by rename) or `FsspecStore` over s3fs."""
    if loc.is_local:
        return LocalStore(loc.path, read_only=read_only)
    return FsspecStore(_async_s3(), path=loc.path, read_only=read_only)


@atexit.register
def _close_async_filesystems() -> None:
    from zarr.core.sync import loop as zarr_loop

    loop = zarr_loop[0]
    with _async_lock:
        filesystems = list(_async_filesystems.values())
        _async_filesystems.clear()
    for fs in filesystems:
        creator = getattr(fs, "_s3creator", None)
        if creator is None or getattr(fs, "_s3", None) is None or loop is None or not loop.is_running():
            continue
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(creator.__aexit__(None, None, None), loop).result(timeout=5)


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
