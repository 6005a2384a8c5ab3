"""The activation store on a real S3 server (SeaweedFS, with credentials checked): the same behaviour as on local
disk, and clear one-line errors for wrong credentials, a missing bucket and an unreachable endpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import s3fs
import torch

from clt_core.data.norm_stats import NormStats, compute_norm_stats
from clt_core.data.storage import NEW_ENDPOINT_RETRY_SECONDS
from clt_core.data.store import ActivationStore
from clt_core.data.verify import verify_store
from clt_core.errors import StoreError

if TYPE_CHECKING:
    from infra.stack.seaweedfs import S3Server

pytestmark = pytest.mark.s3


def s3(server: S3Server) -> s3fs.S3FileSystem:
    """A direct client, to inspect and damage objects behind the store's back."""
    return s3fs.S3FileSystem(
        key=server.access_key, secret=server.secret_key, endpoint_url=server.endpoint, skip_instance_cache=True
    )


def write(url: str, x: torch.Tensor, dtype: str = "bfloat16", rows_per_chunk: int = 8) -> ActivationStore:
    store = ActivationStore.create(
        url, num_layers=x.shape[1], d_model=x.shape[2], dtype=dtype, rows_per_chunk=rows_per_chunk
    )
    with store.writer() as w:
        w.append(x, -x, torch.arange(len(x)))
    return store


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_on_s3_is_bit_exact(s3_url: str, dtype: str) -> None:
    x = torch.randn(20, 2, 4)
    write(s3_url, x, dtype=dtype)
    again = ActivationStore.open(s3_url)
    assert again.num_rows == 20 and again.url == s3_url
    rows = again.read(0, 20)
    assert torch.equal(rows.inputs, x.to(again.torch_dtype)) and torch.equal(rows.targets, (-x).to(again.torch_dtype))
    assert torch.equal(rows.token_ids, torch.arange(20, dtype=torch.int32))
    assert [len(c.token_ids) for c in again.iter_chunks()] == [8, 8, 4]


def test_resumed_appends_on_s3_equal_one_write(s3_url: str, tmp_path: Path) -> None:
    x = torch.randn(45, 2, 4)
    ActivationStore.create(s3_url, num_layers=2, d_model=4, rows_per_chunk=8)
    for lo, hi in ((0, 13), (13, 16), (16, 45)):
        with ActivationStore.open(s3_url, mode="a").writer() as w:
            w.append(x[lo:hi], -x[lo:hi], torch.arange(lo, hi))
    local = write(str(tmp_path / "local"), x)
    remote = ActivationStore.open(s3_url)
    assert remote.num_rows == local.num_rows == 45
    for a, b in zip(remote.read(0, 45), local.read(0, 45), strict=True):
        assert torch.equal(a, b)


def test_create_on_s3_refuses_an_existing_store(s3_url: str) -> None:
    write(s3_url, torch.randn(4, 2, 4))
    with pytest.raises(StoreError, match="already exists; pass --overwrite"):
        ActivationStore.create(s3_url, num_layers=2, d_model=4)
    assert ActivationStore.create(s3_url, num_layers=2, d_model=4, overwrite=True).num_rows == 0


def test_norm_stats_on_s3_equal_local_ones(s3_url: str, tmp_path: Path) -> None:
    x = torch.randn(100, 2, 4) * 3 + 1
    write(s3_url, x, dtype="float32")
    local = write(str(tmp_path / "local"), x, dtype="float32")
    remote_stats = compute_norm_stats(ActivationStore.open(s3_url, mode="a"), workers=3, progress=False)
    local_stats = compute_norm_stats(ActivationStore.open(local.url, mode="a"), workers=1, progress=False)
    back = ActivationStore.open(s3_url).read_norm_stats()
    assert back is not None and back.count == 100
    for name in NormStats.ARRAYS:
        np.testing.assert_allclose(getattr(remote_stats, name), getattr(local_stats, name), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(getattr(back, name), getattr(remote_stats, name))


def test_verify_on_s3_passes_a_good_store_and_finds_damage(s3_url: str, s3_env: S3Server) -> None:
    write(s3_url, torch.randn(40, 2, 4))
    compute_norm_stats(ActivationStore.open(s3_url, mode="a"), progress=False)
    good = verify_store(s3_url, progress=False)
    assert good.ok and good.warnings == [] and good.chunks_scanned == 5, good.summary()
    fs = s3(s3_env)
    prefix = s3_url.removeprefix("s3://")
    fs.pipe(f"{prefix}/inputs/c/1/0/0", b"\x28\xb5\x2f\xfd not really zstd")
    fs.rm(f"{prefix}/token_ids/c/4")
    bad = verify_store(s3_url, progress=False)
    assert not bad.ok and bad.bad_chunks == [1, 4]
    text = bad.summary()
    assert "chunk 1 (rows 8..15) cannot be decoded: 'inputs'" in text
    assert "'token_ids': 1 committed chunk object(s) missing" in text and "chunk 4 (rows 32..39)" in text


def test_clt_verify_on_s3_prints_only_its_report(s3_url: str, s3_env: S3Server) -> None:
    """A real `clt` process: exit status 0 and a clean stderr (no aiohttp "Unclosed client session" noise)."""
    write(s3_url, torch.randn(20, 2, 4))
    proc = subprocess.run(
        [sys.executable, "-m", "clt_core.cli", "verify", s3_url, "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, **s3_env.env()},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{s3_url}: OK: 20 rows")
    assert proc.stderr == ""


def test_a_wrong_secret_is_refused_naming_the_credentials(
    s3_server: S3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(s3_url, torch.randn(4, 2, 4))
    for key, value in s3_server.env(secret="wrong-secret").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StoreError, match=r"access denied .*check the S3 credentials .*AWS_SECRET_ACCESS_KEY"):
        ActivationStore.open(s3_url)
    with pytest.raises(StoreError, match="check the S3 credentials"):
        ActivationStore.create(s3_url + "-new", num_layers=2, d_model=4)
    report = verify_store(s3_url, progress=False)
    assert not report.ok and "check the S3 credentials" in report.problems[0]


def test_an_unknown_access_key_is_refused_naming_the_credentials(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StoreError, match="check the S3 credentials"):
        ActivationStore.create(s3_url, num_layers=2, d_model=4)


def test_a_missing_bucket_is_named_and_not_created(s3_env: S3Server) -> None:
    bucket = f"no-such-bucket-{time.monotonic_ns()}"
    with pytest.raises(StoreError, match=rf"the bucket '{bucket}' does not exist; create it first"):
        ActivationStore.open(f"s3://{bucket}/store")
    with pytest.raises(StoreError, match=rf"the bucket '{bucket}' does not exist"):
        ActivationStore.create(f"s3://{bucket}/store", num_layers=2, d_model=4)
    assert not s3(s3_env).exists(bucket)  # SeaweedFS would have created it on the first write


def test_a_missing_store_in_an_existing_bucket_is_reported(s3_url: str) -> None:
    with pytest.raises(StoreError, match=r"no activation store here \(no zarr.json\)"):
        ActivationStore.open(s3_url)


def test_an_unreachable_endpoint_fails_fast_and_clearly(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("CLT_S3_RETRY_SECONDS", "1")  # how long an outage is retried (tests/faults/test_s3_outage.py)
    start = time.monotonic()
    with pytest.raises(StoreError, match=rf"cannot reach the S3 endpoint {endpoint} .*AWS_ENDPOINT_URL_S3"):
        ActivationStore.open("s3://acts/anything")
    assert time.monotonic() - start < 20
    report = verify_store("s3://acts/anything", progress=False)
    assert not report.ok and "cannot reach the S3 endpoint" in report.problems[0]


def test_an_endpoint_that_never_answered_fails_in_seconds_even_with_the_default_budget(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong port (or a server not started) gets the short budget of an endpoint that never answered, not the
    default 120 s of `CLT_S3_RETRY_SECONDS`, and a line that says so and names the likely causes."""
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.delenv("CLT_S3_RETRY_SECONDS", raising=False)
    start = time.monotonic()
    with pytest.raises(StoreError) as failure:
        ActivationStore.open("s3://acts/anything")
    elapsed = time.monotonic() - start
    assert NEW_ENDPOINT_RETRY_SECONDS <= elapsed < 15, elapsed
    message = str(failure.value)
    assert "\n" not in message and message.startswith("s3://acts/anything: "), message
    assert f"cannot reach the S3 endpoint {endpoint} while trying to " in message
    assert "it has never answered since this process started; gave up after " in message
    assert "(10 s until the endpoint first answers, CLT_S3_RETRY_SECONDS=120 after)" in message
    assert "(AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL) and that the server is running (last error: " in message
