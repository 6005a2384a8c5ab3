"""The S3 endpoint goes away for a while (this test's own SeaweedFS server killed, then started again on the same port
and data) during extraction, scramble and training reads: the requests are retried with backoff and the work ends
exactly as an uninterrupted run. An endpoint that stays down past the retry budget gives one clear line and leaves a
valid store. Refusals and missing objects are never retried."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import numpy as np
import pytest
import torch
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from clt_core.data import storage
from clt_core.data.sampler import ActivationSampler, SamplerConfig
from clt_core.data.scramble import ScrambleConfig, scramble_store
from clt_core.data.storage import S3Unavailable, with_retries
from clt_core.data.store import ActivationStore
from clt_core.data.verify import verify_store
from clt_core.errors import StoreError
from clt_core.extract.extractor import ExtractConfig, extract
from clt_core.lm.corpora import TextConfig
from infra.stack.seaweedfs import S3Server, SeaweedFS

TOKENS, CHUNK = 700, 64
DOWN_S = 3.0
RETRYING = "retrying in"  # what every retry's warning says


def extract_config(model: Path) -> ExtractConfig:
    return ExtractConfig(
        model=str(model),
        text=TextConfig(source="packaged:kjv", max_documents=60),
        tokens=TOKENS,
        context_size=32,
        batch_size=1,  # many small writes: the outage falls in the middle of them
        compute_dtype="float32",
        storage_dtype="bfloat16",
        chunk_rows=CHUNK,
    )


def object_exists(weed: SeaweedFS, url: str, key: str) -> Callable[[], bool]:
    """A trigger: whether `key` exists inside the store at `url` (an `s3://bucket/prefix`)."""
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    s3 = weed.server.client()  # watches the store from outside the code under test

    def check() -> bool:
        try:
            s3.head_object(Bucket=bucket, Key=f"{prefix}/{key}")
            return True
        except (ClientError, BotoCoreError):  # absent, or the busy server slow to answer: look again
            return False

    return check


class Outage:
    """Kills the server as soon as `trigger()` holds (polled from a thread), keeps it down `down_s` seconds, then
    starts it again on the same port and data. `killed_at`/`restarting_at` (monotonic) tell whether and when."""

    def __init__(
        self, weed: SeaweedFS, trigger: Callable[[], bool], down_s: float = DOWN_S, restart: bool = True
    ) -> None:
        self.weed, self.trigger, self.down_s, self.restart = weed, trigger, down_s, restart
        self.killed_at: float | None = None
        self.restarting_at: float | None = None
        self._work_done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="s3-outage", daemon=True)

    def _run(self) -> None:
        try:
            while not self.trigger():
                if self._work_done.wait(0.02):
                    return
            self.weed.stop(kill=True)
            self.killed_at = time.monotonic()
            if self.restart:
                time.sleep(self.down_s)
                self.restarting_at = time.monotonic()
                self.weed.start()
        except BaseException as exc:
            self._error = exc

    def __enter__(self) -> Outage:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType) -> None:
        self._work_done.set()
        self._thread.join(timeout=60)
        if self._error is not None:
            raise self._error

    def assert_spanned(self, work_done_at: float) -> None:
        """The server went down while the work ran, and the work finished only once it was coming back."""
        assert self.killed_at is not None, "the work finished before the outage began: make it longer"
        assert self.restarting_at is not None and work_done_at > self.restarting_at


def retries_logged(caplog: pytest.LogCaptureFixture, url: str = "") -> list[str]:
    """The retry warnings about objects under `url` (reads that an earlier test's sampler left running may retry
    against that test's server, gone since)."""
    messages = (r.getMessage() for r in caplog.records if r.name == "clt_core.data.storage")
    return [m for m in messages if RETRYING in m and m.startswith(url)]


def assert_same_rows(a: ActivationStore, b: ActivationStore, rows: int | None = None) -> None:
    rows = a.num_rows if rows is None else rows
    for x, y in zip(a.read_storage(0, rows), b.read_storage(0, rows), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(autouse=True)
def _budget(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A budget well above the outage, below pytest's timeout; retry warnings captured. botocore's own attempts
    (3 by default, with backoff) would hide a short outage from the retries under test: one here."""
    monkeypatch.setenv("CLT_S3_RETRY_SECONDS", "60")
    monkeypatch.setenv("CLT_S3_MAX_ATTEMPTS", "1")
    caplog.set_level(logging.WARNING, logger="clt_core.data.storage")


@pytest.fixture(scope="module")
def reference(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The uninterrupted extraction, on local disk."""
    url = str(tmp_path_factory.mktemp("reference") / "store")
    extract(url, extract_config(tiny_dirs["llama"]), progress=False)
    return url


def s3_store(url: str, rows: int, chunk: int = 32, d_model: int = 16) -> ActivationStore:
    """Row i holds i + the position in every value, token id i."""
    store = ActivationStore.create(url, num_layers=2, d_model=d_model, dtype="float32", rows_per_chunk=chunk)
    values = torch.arange(rows, dtype=torch.float32)[:, None, None] + torch.arange(2 * d_model).view(1, 2, d_model)
    with store.writer() as w:
        w.append(values, -values, torch.arange(rows))
    return ActivationStore.open(url)


# ----------------------------------------------------------------------------------------- the work goes on
@pytest.mark.s3
def test_opening_a_store_waits_for_the_endpoint_to_come_back(
    own_s3: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    url = "s3://acts/open-during-outage"
    s3_store(url, rows=40)
    own_s3.stop(kill=True)
    with Outage(own_s3, trigger=lambda: True, down_s=1.5) as outage:
        store = ActivationStore.open(url)  # the sync filesystem (does it exist?), then zarr's async one
        rows = store.read(0, 40)
        done = time.monotonic()
    outage.assert_spanned(done)
    assert torch.equal(rows.token_ids, torch.arange(40, dtype=torch.int32))
    assert retries_logged(caplog, f"{url}/zarr.json")  # the first request: does the store exist?
    assert any(r.getMessage().startswith(url) and "succeeded at attempt" in r.getMessage() for r in caplog.records)


@pytest.mark.s3
@pytest.mark.slow
def test_extraction_survives_an_outage_and_equals_an_uninterrupted_run(
    own_s3: SeaweedFS, tiny_dirs: dict[str, Path], reference: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = "s3://acts/extract-during-outage"
    with Outage(own_s3, trigger=object_exists(own_s3, url, "inputs/c/0/0/0")) as outage:
        summary = extract(url, extract_config(tiny_dirs["llama"]), progress=False)
        done = time.monotonic()
    outage.assert_spanned(done)
    assert summary.rows == summary.rows_this_run == TOKENS
    assert retries_logged(caplog, url)
    got, want = ActivationStore.open(url), ActivationStore.open(reference)
    assert got.num_rows == TOKENS
    assert_same_rows(got, want)
    got_stats, want_stats = got.read_norm_stats(), want.read_norm_stats()
    assert got_stats is not None and want_stats is not None and got_stats.count == want_stats.count == TOKENS
    for name in ("inputs_mean", "inputs_std", "targets_mean", "targets_std"):
        np.testing.assert_array_equal(getattr(got_stats, name), getattr(want_stats, name))
    assert verify_store(url, progress=False).ok


@pytest.mark.s3
@pytest.mark.slow
def test_scramble_survives_an_outage_and_equals_an_uninterrupted_run(
    own_s3: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    src = s3_store("s3://acts/scramble-src", rows=2000).url
    config = ScrambleConfig(seed=5, memory_budget="40MB", workers=2)
    scramble_store(src, "s3://acts/scramble-reference", config, progress=False)
    assert not retries_logged(caplog, "s3://acts/scramble")
    url = "s3://acts/scramble-during-outage"
    with Outage(own_s3, trigger=object_exists(own_s3, url, "zarr.json")) as outage:
        summary = scramble_store(src, url, config, progress=False)
        done = time.monotonic()
    outage.assert_spanned(done)
    assert summary.rows == 2000 and retries_logged(caplog, "s3://acts/scramble")
    got, want = ActivationStore.open(url), ActivationStore.open("s3://acts/scramble-reference")
    assert got.info.scrambled and got.num_rows == want.num_rows == 2000
    assert_same_rows(got, want)


@pytest.mark.s3
@pytest.mark.slow
def test_training_reads_survive_an_outage_and_give_the_same_batches(
    own_s3: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    store = s3_store("s3://acts/sampler", rows=1024)  # 32 chunks
    config = SamplerConfig(batch_size=64, buffer_chunks=2, normalization_method="none", read_workers=2)
    n = 40  # more than an epoch: most windows are read after the outage began
    with ActivationSampler(store, config) as sampler:
        expected = [next(sampler) for _ in range(n)]
    with ActivationSampler(store, config) as sampler:
        got = [next(sampler)]
        with Outage(own_s3, trigger=lambda: True) as outage:
            got += [next(sampler) for _ in range(n - 1)]
            done = time.monotonic()
    outage.assert_spanned(done)
    assert retries_logged(caplog, store.url)
    for a, b in zip(got, expected, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.s3
def test_an_endpoint_that_answered_before_is_retried_past_the_short_budget(
    own_s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The short budget of an endpoint that never answered (made 0.5 s here) leaves a server that answered and then
    went away (a restart mid-run) its whole budget."""
    monkeypatch.setattr(storage, "NEW_ENDPOINT_RETRY_SECONDS", 0.5)
    url = "s3://acts/outage-after-answers"
    s3_store(url, rows=40)  # the endpoint has answered
    with socket.socket() as sock:  # first, the same process against a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"never answered since this process started; gave up after .* \(0.5 s until"):
        ActivationStore.open(url)
    assert time.monotonic() - start < 5
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", own_s3.server.endpoint)
    own_s3.stop(kill=True)
    with Outage(own_s3, trigger=lambda: True, down_s=DOWN_S) as outage:
        start = time.monotonic()
        rows = ActivationStore.open(url).read(0, 40)
        done = time.monotonic()
    outage.assert_spanned(done)
    assert done - start > DOWN_S / 2 > 0.5  # retried well past the short budget
    assert torch.equal(rows.token_ids, torch.arange(40, dtype=torch.int32))
    assert retries_logged(caplog, f"{url}/zarr.json")


# ------------------------------------------------------------------------------------------ the budget runs out
@pytest.mark.s3
@pytest.mark.slow
def test_an_outage_past_the_budget_fails_in_one_line_and_leaves_a_valid_store(
    own_s3: SeaweedFS, tiny_dirs: dict[str, Path], reference: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLT_S3_RETRY_SECONDS", "2")
    url = "s3://acts/extract-past-budget"
    start = time.monotonic()
    with (
        Outage(own_s3, trigger=object_exists(own_s3, url, "inputs/c/2/0/0"), restart=False) as outage,
        pytest.raises(StoreError) as failure,
    ):
        extract(url, extract_config(tiny_dirs["llama"]), progress=False)
    assert outage.killed_at is not None
    message = str(failure.value)
    assert "\n" not in message and message.startswith(url), message
    assert f"cannot reach the S3 endpoint {own_s3.server.endpoint} while trying to " in message
    assert "; gave up after " in message and "(CLT_S3_RETRY_SECONDS=2)" in message
    assert time.monotonic() - start < 40  # the budget, not the budget once per pending request
    own_s3.start()
    report = verify_store(url, progress=False)
    assert report.ok, report.problems
    store = ActivationStore.open(url)
    assert 2 * CHUNK <= store.num_rows < TOKENS and store.num_rows % CHUNK == 0  # chunk 2 follows two commits
    assert_same_rows(store, ActivationStore.open(reference), store.num_rows)


# ------------------------------------------------------------------------------------ what is never retried
@pytest.mark.s3
def test_refusals_and_missing_buckets_fail_at_once(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    start = time.monotonic()
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        ActivationStore.open("s3://no-such-bucket/store")
    with pytest.raises(StoreError, match="no activation store here"):
        ActivationStore.open(f"s3://acts/no-such-store-{time.monotonic_ns()}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    with pytest.raises(StoreError, match="access denied"):
        ActivationStore.open("s3://acts/any-store")
    assert time.monotonic() - start < 10
    assert not retries_logged(caplog, "s3://")


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_transient_errors_are_retried_with_growing_delays_others_raised_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a server: 5xx, SlowDown and refused connections are retried, a 403/404 is not."""
    delays: list[float] = []

    async def no_sleep(delay: float) -> None:
        delays.append(delay)

    monkeypatch.setattr(asyncio, "sleep", no_sleep)

    def flaky(errors: list[BaseException]) -> Callable[[], object]:
        async def call() -> str:
            if errors:
                raise errors.pop(0)
            return "ok"

        return call

    translated = OSError(errno.EIO, "We encountered an internal error")  # as s3fs raises a 500
    translated.__cause__ = _client_error(500, "InternalError")
    transient = [translated, _client_error(503, "SlowDown"), ConnectionResetError("reset by peer")]
    transient += [EndpointConnectionError(endpoint_url="http://x")] * 5
    assert asyncio.run(with_retries(flaky(transient), "s3://b/k")) == "ok"
    assert len(delays) == 8 and len(retries_logged(caplog, "s3://b/k")) == 8
    assert all(b >= a / 2 for a, b in itertools.pairwise(delays)) and delays[-1] > 4 * delays[0]
    assert max(delays) <= 10
    for refusal in (_client_error(403, "AccessDenied"), PermissionError("denied"), FileNotFoundError("k")):
        delays.clear()
        with pytest.raises(type(refusal)):
            asyncio.run(with_retries(flaky([refusal]), "s3://b/k"))
        assert delays == []
    # Past the budget, an endpoint is given up on: the next failing request there gets no budget of its own (the
    # cleanup after a failure is not held up), until a request to it succeeds again.
    monkeypatch.setenv("CLT_S3_RETRY_SECONDS", "0")
    down = EndpointConnectionError(endpoint_url="http://x")
    with pytest.raises(S3Unavailable, match=r"gave up after 1 attempt\(s\) over 0 s \(CLT_S3_RETRY_SECONDS=0\)"):
        asyncio.run(with_retries(flaky([down]), "s3://b/k", endpoint="http://x"))
    monkeypatch.setenv("CLT_S3_RETRY_SECONDS", "60")
    delays.clear()
    with pytest.raises(S3Unavailable, match="another request to this endpoint had already retried for the whole"):
        asyncio.run(with_retries(flaky([down]), "s3://b/k", endpoint="http://x"))
    assert delays == [] and asyncio.run(with_retries(flaky([]), "s3://b/k", endpoint="http://x")) == "ok"
    assert asyncio.run(with_retries(flaky([down]), "s3://b/k", endpoint="http://x")) == "ok" and len(delays) == 1


def test_an_endpoint_gets_the_full_budget_once_it_has_answered_even_with_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a server, the short budget made 0: an endpoint that never answered fails at its first refused
    connection; one that answered a 404 (the server is there) is retried."""

    async def no_sleep(delay: float) -> None:
        pass

    def flaky(errors: list[BaseException]) -> Callable[[], object]:
        async def call() -> str:
            if errors:
                raise errors.pop(0)
            return "ok"

        return call

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    monkeypatch.setattr(storage, "NEW_ENDPOINT_RETRY_SECONDS", 0.0)
    never, answered = (f"http://{name}-{time.monotonic_ns()}" for name in ("never", "answered"))
    down = EndpointConnectionError(endpoint_url="http://x")
    rule = r"over 0 s \(0 s until the endpoint first answers, CLT_S3_RETRY_SECONDS=60 after\)"
    with pytest.raises(S3Unavailable, match=rule) as failure:
        asyncio.run(with_retries(flaky([down]), "s3://b/k", endpoint=never))
    assert failure.value.never_answered and failure.value.unreachable
    missing = FileNotFoundError("k")  # as s3fs raises a 404
    missing.__cause__ = _client_error(404, "NoSuchKey")
    with pytest.raises(FileNotFoundError):
        asyncio.run(with_retries(flaky([missing]), "s3://b/k", endpoint=answered))
    assert asyncio.run(with_retries(flaky([down, down]), "s3://b/k", endpoint=answered)) == "ok"
