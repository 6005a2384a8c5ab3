"""Leases on writing a store: one writer at a time, a crashed writer's lease taken over, a lost lease noticed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clt_core.data.lease import StoreLease
from clt_core.errors import StoreError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_url")


def _forge(lease: StoreLease, **fields: object) -> None:
    """Write a holder record as another run would have left it."""
    record = {"owner": "other", "host": socket.gethostname(), "pid": os.getpid(), "acquired": time.time(),
              "expires": time.time() + 60, "what": "extract shard 0/2", **fields}  # fmt: skip
    current = lease.backend.read()
    body = json.dumps(record).encode()
    if current is None:
        lease.backend.create(body)
    else:
        lease.backend.replace(body, current[1])


def test_one_writer_at_a_time_and_the_other_is_told_who_holds_it(url: str) -> None:
    with StoreLease(url, "writer", what="extract 0/1", ttl_s=30):
        with pytest.raises(StoreError) as err:
            StoreLease(url, "writer", ttl_s=30).acquire()
        message = str(err.value)
        assert "\n" not in message and "is being written by extract 0/1 on" in message
        assert f"pid {os.getpid()}" in message and ".lease.writer.json" in message  # beside the store
        with StoreLease(url, "shard-1-of-2", ttl_s=30):  # another name is another lease
            pass
    with StoreLease(url, "writer", ttl_s=30):  # released on exit: the next writer gets it at once
        pass


def test_a_dead_holder_on_this_host_or_an_expired_lease_is_taken_over(url: str) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = StoreLease(url, "writer", ttl_s=30)
    _forge(lease, pid=int(dead.stdout))  # a SIGKILLed run of this host: restart at once
    with lease:
        lease.check()
    _forge(lease, host="elsewhere", expires=time.time() - 1)  # another host's, run out
    with lease:
        lease.check()
    _forge(lease, host="elsewhere")  # another host's, still valid
    with pytest.raises(StoreError, match=r"is being written by .* on elsewhere"):
        lease.acquire()


def test_a_holder_whose_lease_was_taken_over_stops(url: str) -> None:
    lease = StoreLease(url, "writer", ttl_s=0.6).acquire()
    try:
        _forge(lease)  # another run took it over (say, this one could not renew in time)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and lease._lost is None:
            time.sleep(0.05)
        with pytest.raises(StoreError, match=r"lost the lease writer .*another run took it over.*stopped writing"):
            lease.check()
    finally:
        lease.release()
    assert json.loads(lease.backend.read()[0])["owner"] == "other"  # the loser leaves the winner's lease alone


def test_the_lease_is_renewed_while_held(url: str) -> None:
    with StoreLease(url, "writer", ttl_s=0.9) as lease:
        first = json.loads(lease.backend.read()[0])["expires"]
        time.sleep(1.2)
        record = json.loads(lease.backend.read()[0])
        assert record["expires"] > first and record["owner"] == lease.owner
        with pytest.raises(StoreError, match="is being written"):
            StoreLease(url, "writer").acquire()  # still held after its first time to live
        lease.check()


def test_a_second_extraction_into_a_store_being_written_is_refused(
    url: str, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Two runs writing one store at once: the second is refused in one line and the first finishes unharmed."""
    import yaml

    from clt_core.data.store import ActivationStore
    from clt_core.data.verify import verify_store
    from clt_core.extract.extractor import ExtractConfig, extract

    cfg = ExtractConfig(model=str(tiny_dirs["llama"]), text={"source": "packaged:kjv", "max_documents": 200},
                        tokens=2048, context_size=32, batch_size=1, compute_dtype="float32", chunk_rows=64)  # fmt: skip
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    command = [sys.executable, "-m", "clt_core.cli", "extract", "--quiet", "--config", str(tmp_path / "extract.yaml")]
    first = subprocess.Popen([*command, "--out", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lease = StoreLease(url, "extract")
    deadline = time.monotonic() + 60
    while lease.backend.read() is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    with pytest.raises(StoreError) as err:
        extract(url, cfg, progress=False)
    assert "is being written by extract on" in str(err.value) and "\n" not in str(err.value)
    _, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors
    store = ActivationStore.open(url)
    assert store.num_rows == cfg.tokens and verify_store(url).ok
    assert lease.backend.read() is None  # released
