"""Exclusive, expiring leases on writing a store: two runs that would write the same rows at once cannot both start.

A lease is one small JSON object beside the store (`{store}.lease.{name}.json`, so creating, overwriting or removing
the store never deletes a live lease; inside it for a store at a bucket's root). It is created only if absent (local
disk: `O_EXCL`; S3: a conditional put, `If-None-Match: *`) and renewed in the background every third of its time to
live by a compare-and-swap on its version (local: under `flock`; S3: `If-Match` on the ETag). Another writer is
refused with one line naming the holder (what, host, pid, since when, until when). A lease whose time ran out, or
whose holder is a dead process on this host (a SIGKILLed run restarted at once), is taken over by the same
compare-and-swap, so a resumed run never waits for a crash it can see. A holder that loses its lease (it could not
renew in time and another run took it over) is told at its next `check()` and stops.

Time to live: `CLT_LEASE_TTL_S` (default 60 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fsspec.asyn import sync

from clt_core.data.storage import StoreLocation, filesystem, parse_url, storage_errors
from clt_core.errors import StoreError

log = logging.getLogger(__name__)


def default_ttl() -> float:
    return float(os.environ.get("CLT_LEASE_TTL_S", "60"))


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    acquired: float
    expires: float
    what: str

    def describe(self) -> str:
        def stamp(t: float) -> str:
            return time.strftime("%H:%M:%S", time.localtime(t))

        since, until = stamp(self.acquired), stamp(self.expires)
        return f"{self.what} on {self.host} (pid {self.pid}) since {since}, lease until {until}"

    def stale(self, now: float) -> bool:
        """Expired, or held by a process of this host that no longer exists."""
        return now > self.expires or (self.host == socket.gethostname() and not _alive(self.pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeaseHeld(StoreError):
    """The lease is held by another live writer."""


class _Conflict(Exception):
    """The lease object changed (or appeared) since it was read."""


class _Backend:
    """Create-if-absent, read with a version, replace-if-version and delete on one object."""

    def __init__(self, loc: StoreLocation, name: str) -> None:
        parent, _, base = loc.path.rstrip("/").rpartition("/")
        inside = not parent or (not loc.is_local and "/" not in loc.path.strip("/"))  # a bucket's root
        self.loc = loc
        self.key = f"{loc.path}/lease.{name}.json" if inside else f"{parent}/{base}.lease.{name}.json"

    def create(self, body: bytes) -> str:
        raise NotImplementedError

    def read(self) -> tuple[bytes, str] | None:
        raise NotImplementedError

    def replace(self, body: bytes, version: str) -> str:
        raise NotImplementedError

    def delete(self) -> None:
        raise NotImplementedError


class _Local(_Backend):
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive against other lease operations in the same directory (a lock on the directory itself: no
        lock file is left behind)."""
        parent = Path(self.key).parent
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _version(st: os.stat_result) -> str:
        return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"

    def create(self, body: bytes) -> str:
        with self._locked():
            try:
                fd = os.open(self.key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise _Conflict from None
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            return self._version(os.stat(self.key))

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.key, "rb") as fh:  # the version of the very file read (a replace makes a new inode)
                return fh.read(), self._version(os.fstat(fh.fileno()))
        except FileNotFoundError:
            return None

    def replace(self, body: bytes, version: str) -> str:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                raise _Conflict
            tmp = f"{self.key}.{uuid.uuid4().hex}.tmp"
            Path(tmp).write_bytes(body)
            os.replace(tmp, self.key)
            return self._version(os.stat(self.key))

    def delete(self) -> None:
        with self._locked():
            Path(self.key).unlink(missing_ok=True)


class _S3(_Backend):
    def __init__(self, loc: StoreLocation, name: str) -> None:
        super().__init__(loc, name)
        self.fs = filesystem(loc)
        self.bucket, self.object = self.key.split("/", 1)

    def _put(self, body: bytes, **condition: str) -> str:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.object, Body=body, **condition)["ETag"]
        except Exception as err:  # s3fs re-raises botocore's PreconditionFailed as OSError or ClientError
            text = f"{type(err).__name__} {err}".lower()
            if any(s in text for s in ("precondition", "pre-condition", "conditionalrequestconflict", " 412")):
                raise _Conflict from None
            raise

    def create(self, body: bytes) -> str:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str] | None:
        try:
            response = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.object)
        except FileNotFoundError:
            return None
        return sync(self.fs.loop, response["Body"].read), response["ETag"]

    def replace(self, body: bytes, version: str) -> str:
        return self._put(body, IfMatch=version)

    def delete(self) -> None:
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.object)


class StoreLease:
    """The lease `name` on the store at `url` (use as a context manager around the writes it guards)."""

    def __init__(self, url: str, name: str, *, what: str = "a writer", ttl_s: float | None = None) -> None:
        self.loc = parse_url(url)
        self.name, self.what = name, what
        self.ttl = ttl_s if ttl_s is not None else default_ttl()
        self.owner = uuid.uuid4().hex
        self.backend: _Backend = (_Local if self.loc.is_local else _S3)(self.loc, name)
        self._version: str | None = None
        self._acquired = self._expires = 0.0  # set by acquire; _expires moves on with each renewal
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.backend.key if self.loc.is_local else f"s3://{self.backend.key}"

    def _record(self, now: float) -> bytes:
        """This holder's lease, valid for the time to live from `now`."""
        record = LeaseRecord(self.owner, socket.gethostname(), os.getpid(), self._acquired, now + self.ttl, self.what)
        return json.dumps(asdict(record)).encode()

    def acquire(self) -> StoreLease:
        self._acquired = now = time.time()
        with storage_errors(self.loc.url, f"take the lease {self.name}"):
            for _ in range(5):
                try:
                    self._version = self.backend.create(self._record(now))
                    break
                except _Conflict:
                    pass
                current = self.backend.read()
                if current is None:
                    continue  # released meanwhile: try again
                try:
                    holder = LeaseRecord(**json.loads(current[0]))
                except (ValueError, TypeError):
                    holder = None  # unreadable (a torn write from an old version): treat as stale
                if holder is not None and not holder.stale(time.time()):
                    raise LeaseHeld(
                        f"{self.loc.url} is being written by {holder.describe()}; wait for it to finish (a crashed "
                        f"holder's lease runs out within {self.ttl:.0f} s), or delete {self.path} if it is dead"
                    )
                try:
                    self._version = self.backend.replace(self._record(now), current[1])
                    if holder is not None:
                        log.warning("%s: took over the stale lease of %s", self.loc.url, holder.describe())
                    break
                except _Conflict:
                    continue  # another run took it over first: look again
            else:
                raise StoreError(f"{self.loc.url}: could not take the lease {self.name} (it keeps changing)")
        self._expires = now + self.ttl
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            now = time.time()
            try:
                self._version = self.backend.replace(self._record(now), self._version or "")
                self._expires = now + self.ttl
            except _Conflict:
                self._lost = "another run took it over"
                return
            except Exception as err:  # storage unreachable: try again until the lease runs out
                log.warning("%s: could not renew the lease %s: %s", self.loc.url, self.name, err)
                if time.time() > self._expires:
                    self._lost = f"it ran out while it could not be renewed ({err})"
                    return

    def check(self) -> None:
        """Raise if the lease was lost: the caller must stop writing."""
        if self._lost:
            raise StoreError(f"{self.loc.url}: lost the lease {self.name} ({self._lost}); stopped writing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._lost or self._version is None:
            return
        with contextlib.suppress(Exception):  # a lease left behind only delays the next writer by its time to live
            current = self.backend.read()
            if current is not None and json.loads(current[0]).get("owner") == self.owner:
                self.backend.delete()
        self._version = None

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
