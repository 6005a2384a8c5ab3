"""Where stores live: URLs (`/abs/path`, `file://…`, `s3://bucket/prefix`) to fsspec filesystems and zarr stores.

S3 endpoint and credentials come from the environment only (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), never from code or configs.
Every S3 request is retried with backoff while the endpoint is unreachable or failing transiently
(`RetryingS3FileSystem`, budget `CLT_S3_RETRY_SECONDS`; only `NEW_ENDPOINT_RETRY_SECONDS` for an endpoint that has
not answered this process yet, so that a wrong URL or a server not started fails in seconds). Low-level storage
exceptions are translated into one-line `StoreError`s by `storage_errors`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from clt_core.errors import StoreError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS_VAR = "CLT_S3_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
# The budget of an endpoint that has not answered once since the process started (a wrong URL or port, the server not
# started): a few attempts, then one line, rather than minutes of retries. `CLT_S3_RETRY_SECONDS` below it wins.
NEW_ENDPOINT_RETRY_SECONDS = 10.0
# Backoff between attempts: doubling from the first delay up to the cap, each delay drawn in [d/2, d] (jitter, so
# the many requests that failed together do not all come back at the same moment).
RETRY_FIRST_DELAY, RETRY_MAX_DELAY = 0.25, 10.0
# S3 error codes worth sending again (besides every 5xx): throttling and request timeouts.
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout", "InternalError",
     "ServiceUnavailable"}
)  # fmt: skip


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
    """s3fs options from the environment, with short timeouts so that each attempt at an unreachable endpoint fails
    fast (`CLT_S3_CONNECT_TIMEOUT` seconds, `CLT_S3_MAX_ATTEMPTS` tries inside botocore).

    Above that, every request that fails transiently (endpoint unreachable, connection refused or reset, timeout,
    5xx, SlowDown) is sent again with exponential backoff for up to `CLT_S3_RETRY_SECONDS` (default 120; 0 turns
    retrying off), logging a warning per retry; refusals and missing objects fail at once. An endpoint that has never
    answered this process gets at most `NEW_ENDPOINT_RETRY_SECONDS` (10). See `retry_seconds` and `with_retries`.

    Credentials set in the environment are passed explicitly so that they are part of the filesystem cache key:
    changing them (another user, a rotated secret) gives a new client rather than a stale cached one. Unset, s3fs
    falls back to botocore's usual chain (profiles, instance roles)."""
    env = os.environ
    retry_seconds()  # a bad value is refused before any request
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


def retry_seconds() -> float:
    """How long a transiently failing S3 request is retried: `CLT_S3_RETRY_SECONDS`, read at each failure."""
    raw = os.environ.get(RETRY_SECONDS_VAR, "").strip()
    if not raw:
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise StoreError(f"{RETRY_SECONDS_VAR}={raw!r}: give the S3 retry budget as seconds >= 0 (0: no retries)")
    return value


def is_transient(exc: BaseException, *, idempotent: bool = True) -> bool:
    """Whether an S3 request that raised `exc` may succeed when sent again: the endpoint unreachable, a connection
    refused, reset or timed out, or the server failing or overloaded (5xx, SlowDown). Never a refusal (credentials,
    permissions, certificates), a missing bucket or object, or a bad request. A request that is not `idempotent` (a
    conditional put) counts only failures that show it never reached the server: sent twice, its second try could
    fail its own condition."""
    import ssl

    import aiohttp
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, HTTPClientError, SSLError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    refusals = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError, SSLError,
                ssl.SSLError, aiohttp.ClientSSLError)  # fmt: skip
    if isinstance(exc, refusals):
        return False
    if not idempotent:
        return isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionRefusedError)
    network = (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError, aiohttp.ClientConnectionError,
               aiohttp.ClientPayloadError)  # fmt: skip
    if isinstance(exc, network):
        return True
    # s3fs turns a ClientError into an OSError whose cause is the ClientError
    for err in (exc, exc.__cause__):
        if isinstance(err, ClientError):
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or err.response.get("Error", {}).get("Code") in TRANSIENT_CODES
    return False


class S3Unavailable(Exception):
    """A transient S3 failure that outlasted the retry budget; `storage_errors` makes it a StoreError.
    `never_answered`: the endpoint has not answered once since the process started (likely a wrong URL or port, or
    a server not running); `setting` is `CLT_S3_RETRY_SECONDS` when the budget was cut short for that reason."""

    def __init__(
        self,
        url: str,
        attempts: int,
        seconds: float,
        budget: float,
        last: BaseException,
        *,
        given_up: bool = False,
        never_answered: bool = False,
        setting: float | None = None,
    ) -> None:
        self.url, self.last, self.never_answered = url, last, never_answered
        if setting is not None and budget < setting:
            rule = f"{budget:g} s until the endpoint first answers, {RETRY_SECONDS_VAR}={setting:g} after"
        else:
            rule = f"{RETRY_SECONDS_VAR}={budget:g}"
        self.gave_up = f"gave up after {attempts} attempt(s) over {seconds:.0f} s ({rule})"
        if given_up:
            self.gave_up += ", as another request to this endpoint had already retried for the whole budget"
        self.unreachable = not _server_answered(last)
        super().__init__(f"{url}: S3 request failed, {self.gave_up}; last error: {first_line(last, limit=300)}")


def _server_answered(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return any(isinstance(err, ClientError) for err in (exc, exc.__cause__))


@dataclass
class _Endpoint:
    """What this process knows of one S3 endpoint (see `with_retries`)."""

    answered: bool = False  # it has sent a response (a success or an S3 error): the full budget applies
    given_up: bool = False  # a request gave up on it after its whole budget, and none has succeeded there since


# Per endpoint URL ("" for AWS's default), for the whole process: requests to one endpoint run on several threads
# (fsspec's loop, zarr's loop), hence the lock.
_endpoints: dict[str, _Endpoint] = {}
_endpoints_lock = threading.Lock()


def _endpoint_state(endpoint: str) -> tuple[bool, bool]:
    """(answered, given_up) for the endpoint."""
    with _endpoints_lock:
        state = _endpoints.get(endpoint) or _Endpoint()
        return state.answered, state.given_up


def _note_endpoint(endpoint: str, *, answered: bool = False, succeeded: bool = False, gave_up: bool = False) -> None:
    with _endpoints_lock:
        state = _endpoints.setdefault(endpoint, _Endpoint())
        state.answered = state.answered or answered or succeeded
        state.given_up = gave_up or (state.given_up and not succeeded)


async def with_retries(
    call: Callable[[], Awaitable[T]], url: str, what: str = "S3 request", *, endpoint: str = "", idempotent: bool = True
) -> T:
    """Await `call()`, calling it again after transient failures (`is_transient`) with capped exponential backoff
    and jitter until it succeeds or `retry_seconds()` have passed since the first failure; then `S3Unavailable`.
    Other errors propagate at once. Each retry logs one warning naming `url`.

    Per `endpoint`, for the whole process: until it has answered once (any response, even an S3 error), the budget
    is at most `NEW_ENDPOINT_RETRY_SECONDS`, counted from the first try (the whole wait of a user who mistyped the
    URL), as an endpoint that never answered is more likely wrong than restarting.
    Once a request there gave up after its whole budget, the requests that fail there get no budget of their own
    until one succeeds: cleanup after the failure (lease release, removing a partial store) and requests queued
    behind it fail at once instead of each waiting out another budget."""
    attempt, first_failure, started = 0, 0.0, time.monotonic()
    while True:
        attempt += 1
        try:
            result = await call()
        except Exception as exc:
            if _server_answered(exc):
                _note_endpoint(endpoint, answered=True)
            if not is_transient(exc, idempotent=idempotent):
                raise
            now = time.monotonic()
            first_failure = first_failure or now
            setting, (answered, given_up) = retry_seconds(), _endpoint_state(endpoint)
            if answered:
                budget, elapsed = setting, now - first_failure
            else:
                budget, elapsed = min(setting, NEW_ENDPOINT_RETRY_SECONDS), now - started
            failure = functools.partial(
                S3Unavailable, url, attempt, elapsed, budget, exc, never_answered=not answered, setting=setting
            )
            if given_up:
                raise failure(given_up=True) from exc
            if elapsed >= budget:
                _note_endpoint(endpoint, gave_up=True)
                raise failure() from exc
            ceiling = min(RETRY_MAX_DELAY, RETRY_FIRST_DELAY * 2 ** (attempt - 1))
            delay = min(random.uniform(ceiling / 2, ceiling), budget - elapsed)
            log.warning(
                "%s: %s failed (attempt %d: %s: %s); retrying in %.1f s, %.0f s of the %g s retry budget left",
                url, what, attempt, type(exc).__name__, first_line(exc, limit=300), delay, budget - elapsed, budget,
            )  # fmt: skip
            await asyncio.sleep(delay)
        else:
            _note_endpoint(endpoint, succeeded=True)
            if attempt > 1:
                log.warning("%s: %s succeeded at attempt %d", url, what, attempt)
            return result


@functools.cache
def _retrying_s3_class() -> type[fsspec.AbstractFileSystem]:
    """`RetryingS3FileSystem`, made on first use: importing s3fs costs time that `clt --help` need not pay."""
    from s3fs import S3FileSystem

    class RetryingS3FileSystem(S3FileSystem):
        """s3fs whose every request retries transient failures (`with_retries`). `_call_s3` is the one method all
        S3 requests of s3fs go through, synchronous or not (listings page by page; a body cut off while read is
        retried by s3fs, which calls it again). Conditional puts (leases) are retried only when they never left."""

        async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
            target = kwargs.get("Key") or kwargs.get("Prefix") or ""
            url = f"s3://{kwargs.get('Bucket', '')}/{target}".rstrip("/")
            conditional = any(k in kwargs for k in ("IfMatch", "IfNoneMatch"))
            parent = super()._call_s3
            return await with_retries(
                lambda: parent(method, *args, **kwargs),
                url,
                f"S3 {method}",
                endpoint=str(self.endpoint_url or ""),
                idempotent=not conditional,
            )

    RetryingS3FileSystem.__module__ = __name__
    RetryingS3FileSystem.__qualname__ = "RetryingS3FileSystem"  # found by pickle through the module's __getattr__
    return RetryingS3FileSystem


def __getattr__(name: str) -> Any:
    if name == "RetryingS3FileSystem":
        return _retrying_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def filesystem(loc: StoreLocation) -> fsspec.AbstractFileSystem:
    """A synchronous filesystem for the location (cached by fsspec per set of options)."""
    if loc.is_local:
        return fsspec.filesystem("file")
    return _retrying_s3_class()(**s3_options())


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
            s3_class = _retrying_s3_class()
            _async_filesystems[key] = s3_class(asynchronous=True, skip_instance_cache=True, **options)
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


@contextlib.contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Translate filesystem/S3 exceptions raised while doing `action` on `url` into one-line StoreErrors."""
    try:
        yield
    except StoreError:
        raise
    except S3Unavailable as exc:
        endpoint = s3_options().get("endpoint_url", "the default AWS endpoint")
        if exc.unreachable and exc.never_answered:
            raise StoreError(
                f"{url}: cannot reach the S3 endpoint {endpoint} while trying to {action}; it has never answered "
                f"since this process started; {exc.gave_up}; check its URL and port (AWS_ENDPOINT_URL_S3, else "
                f"AWS_ENDPOINT_URL) and that the server is running (last error: {first_line(exc.last, limit=300)})"
            ) from None
        if exc.unreachable:
            raise StoreError(
                f"{url}: cannot reach the S3 endpoint {endpoint} while trying to {action}; {exc.gave_up}; is the "
                f"server running and AWS_ENDPOINT_URL_S3 right? (last error: {first_line(exc.last, limit=300)})"
            ) from None
        raise StoreError(
            f"{url}: the S3 endpoint {endpoint} kept failing while trying to {action}; {exc.gave_up} (last error: "
            f"{first_line(exc.last, limit=300)})"
        ) from None
    except PermissionError as exc:
        msg = first_line(exc, limit=300)
        if "signature" in msg.lower() or "accessdenied" in msg.lower() or "forbidden" in msg.lower():
            raise StoreError(
                f"{url}: access denied while trying to {action} ({msg}); check the S3 credentials "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        raise StoreError(f"{url}: permission denied while trying to {action} ({msg})") from None
    except FileNotFoundError as exc:
        msg = first_line(exc, limit=300)
        if "bucket" in msg.lower():
            raise StoreError(f"{url}: the bucket does not exist ({msg}); create it first") from None
        raise StoreError(f"{url}: not found while trying to {action} ({msg})") from None
    except OSError as exc:
        msg = first_line(exc, limit=300)
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
            raise StoreError(f"{url}: S3 refused to {action}: {first_line(exc, limit=300)}") from None
        raise
