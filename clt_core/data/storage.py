"""Where stores live: URLs (`/abs/path`, `file://…`, `s3://bucket/prefix`) to fsspec filesystems and zarr stores.

S3 endpoint and credentials come from the environment only (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), never from code or configs.
Low-level storage exceptions are translated into one-line `StoreError`s by `storage_errors`.
"""

from __future__ import annotations

import contextlib
import os
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
    return FsspecStore(fs, path=loc.path, read_only=read_only)


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
                f"{url}: access denied while trying to {action} ({msg}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
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
