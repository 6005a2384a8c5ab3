"""The Zarr activation store: bit-exact round trips, chunked appends that resume seamlessly, the commit protocol under
SIGKILL, and one clear StoreError for every kind of bad input.

Run as a script (`python test_store.py URL MODE K`) this file is the writer that the crash tests kill.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from clt_core.data.layout import FORMAT_VERSION, INFO_KEY, PLAIN_FORMAT_VERSION, StoreInfo
from clt_core.data.store import ActivationStore
from clt_core.errors import StoreError

# -------------------------------------------------------------------------------------------------- shared data
# The crash writer (a subprocess running this file) and the tests must produce the very same rows.
CRASH_L, CRASH_D, CRASH_RPC = 4, 256, 512
CRASH_ROWS = CRASH_RPC * 24
CRASH_BLOCK = 333  # appends deliberately not aligned with chunks


def crash_rows(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic rows [lo, hi): a function of the row index only, identical in every process."""
    idx = torch.arange(lo, hi, dtype=torch.float64)[:, None, None]
    col = torch.arange(CRASH_L * CRASH_D, dtype=torch.float64).reshape(1, CRASH_L, CRASH_D)
    inputs = torch.sin(idx * 0.013 + col * 0.37).float()
    targets = torch.cos(idx * 0.007 - col * 0.11).float()
    return inputs, targets, torch.arange(lo, hi) % 50_000


def write_crash_store(url: str, start: int = 0, create: bool = True) -> ActivationStore:
    """Append the crash rows from `start` to the end in CRASH_BLOCK-sized appends, then close."""
    if create:
        store = ActivationStore.create(
            url, num_layers=CRASH_L, d_model=CRASH_D, dtype="float32", rows_per_chunk=CRASH_RPC
        )
    else:
        store = ActivationStore.open(url, mode="a")
    with store.writer() as w:
        for lo in range(start, CRASH_ROWS, CRASH_BLOCK):
            w.append(*crash_rows(lo, min(lo + CRASH_BLOCK, CRASH_ROWS)))
    return store


def _writer_main(url: str, mode: str, hang_at: int) -> None:
    """Subprocess body. `hang`: block inside the `hang_at`-th commit, after its chunk data was written, so the test
    kills it exactly between data and commit. `run`: keep appending, reporting each commit, until killed."""
    real_update = ActivationStore.update_info
    calls = 0

    def update_info(self: ActivationStore, **fields: object) -> None:
        nonlocal calls
        calls += 1
        if mode == "hang" and calls == hang_at:
            print(f"DATA_WRITTEN {fields['rows_committed']}", flush=True)
            time.sleep(600)
        real_update(self, **fields)
        print(f"COMMITTED {fields['rows_committed']}", flush=True)

    ActivationStore.update_info = update_info  # type: ignore[method-assign]
    write_crash_store(url)
    print("DONE", flush=True)


# ------------------------------------------------------------------------------------------------------ helpers
def raw_array(path: Path, name: str) -> zarr.Array:
    return zarr.open_group(str(path), mode="r")[name]


def chunk_objects(path: Path) -> dict[str, bytes]:
    """Every chunk object of the store (relative key -> bytes), ignoring leftovers of killed writes."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("c/**/*"))
        if p.is_file() and not p.name.endswith(".partial")
    }


def assert_same_store(a: Path, b: Path) -> None:
    """Same committed rows, same array shapes, same metadata (but the creation time), byte-identical chunks."""
    sa, sb = ActivationStore.open(str(a)), ActivationStore.open(str(b))
    assert sa.num_rows == sb.num_rows
    for name in ("inputs", "targets", "token_ids"):
        assert getattr(sa, name).shape == getattr(sb, name).shape, name
    ra, rb = sa.read(0, sa.num_rows), sb.read(0, sb.num_rows)
    for x, y in zip(ra, rb, strict=True):
        assert torch.equal(x, y)
    ia, ib = sa.info.model_dump(), sb.info.model_dump()
    ia.pop("created_at"), ib.pop("created_at")
    assert ia == ib
    ca, cb = chunk_objects(a), chunk_objects(b)
    assert sorted(ca) == sorted(cb)
    assert all(ca[k] == cb[k] for k in ca), [k for k in ca if ca[k] != cb[k]]


def bits(x: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor, so NaN payloads and -0.0 compare exactly."""
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def special_values(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows salted with the values a lossy path would mangle: ±0, ±inf, NaN, subnormals, extremes."""
    x = torch.randn(n, 3, 5).to(dtype)
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.tiny / 2, info.max, info.min])
    x.view(-1)[: len(specials)] = specials.to(dtype)
    return x


# ------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "stored"),
    [
        ("bfloat16", torch.bfloat16, np.uint16),
        ("float16", torch.float16, np.float16),
        ("float32", torch.float32, np.float32),
    ],
)
def test_round_trip_is_bit_exact_in_every_dtype(
    tmp_path: Path, dtype: str, torch_dtype: torch.dtype, stored: type
) -> None:
    x, y = special_values(21, torch_dtype), special_values(21, torch_dtype)
    ids = torch.arange(21, dtype=torch.int32) * 7
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=3, d_model=5, dtype=dtype, rows_per_chunk=8)
    with store.writer() as w:
        w.append(x, y, ids)
    back = ActivationStore.open(str(tmp_path / "s")).read(0, 21)
    assert back.inputs.dtype == torch_dtype and back.targets.dtype == torch_dtype
    assert torch.equal(bits(back.inputs), bits(x)) and torch.equal(bits(back.targets), bits(y))
    assert torch.equal(back.token_ids, ids)
    raw = raw_array(tmp_path / "s", "inputs")
    assert raw.dtype == np.dtype(stored)
    assert raw.attrs["logical_dtype"] == dtype
    assert raw.chunks == (8, 3, 5)


def test_bfloat16_is_stored_as_its_uint16_bits(tmp_path: Path) -> None:
    """Other tools read the raw array: its uint16 values must be exactly `tensor.view(torch.uint16)`."""
    x = torch.randn(10, 2, 4).to(torch.bfloat16)
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=4, rows_per_chunk=4)
    with store.writer() as w:
        w.append(x, x)
    raw = raw_array(tmp_path / "s", "inputs")[...]
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, x.view(torch.uint16).numpy())


def test_float32_input_is_rounded_to_the_store_dtype(tmp_path: Path) -> None:
    x = torch.randn(5, 2, 4)
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=4, dtype="float16", rows_per_chunk=4)
    with store.writer() as w:
        w.append(x, x.numpy())  # tensors and numpy arrays alike
    back = store.read(0, 5)
    assert torch.equal(back.inputs, x.half()) and torch.equal(back.targets, x.half())


def test_odd_sized_appends_fill_whole_chunks(tmp_path: Path) -> None:
    sizes = [1, 7, 13, 0, 2, 30, 5]
    x = torch.randn(sum(sizes), 2, 3)
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=3, dtype="float32", rows_per_chunk=8)
    with store.writer() as w:
        at = 0
        for n in sizes:
            w.append(x[at : at + n], -x[at : at + n], torch.arange(at, at + n))
            at += n
            assert w.committed == at - at % 8  # only whole chunks are committed before close()
    assert store.num_rows == 58 and store.num_chunks == 8
    again = ActivationStore.open(str(tmp_path / "s"))
    rows = again.read(0, 58)
    assert torch.equal(rows.inputs, x) and torch.equal(rows.targets, -x)
    assert torch.equal(rows.token_ids, torch.arange(58, dtype=torch.int32))
    assert again.inputs.shape == (58, 2, 3)  # close() trims the over-allocated arrays
    assert len(list((tmp_path / "s" / "inputs" / "c").iterdir())) == 8
    assert [len(c.token_ids) for c in again.iter_chunks()] == [8] * 7 + [2]


def test_appending_after_reopen_continues_a_partial_last_chunk_seamlessly(tmp_path: Path) -> None:
    """Writing in several sessions (each closing with a partial chunk) gives the same store as one session."""
    x = torch.randn(45, 2, 3)
    ids = torch.arange(45)
    one = ActivationStore.create(str(tmp_path / "one"), num_layers=2, d_model=3, rows_per_chunk=8)
    with one.writer() as w:
        w.append(x, x * 2, ids)
    ActivationStore.create(str(tmp_path / "many"), num_layers=2, d_model=3, rows_per_chunk=8)
    cuts = [0, 3, 11, 16, 29, 30, 45]
    for lo, hi in itertools.pairwise(cuts):
        store = ActivationStore.open(str(tmp_path / "many"), mode="a")
        assert store.num_rows == lo
        with store.writer() as w:
            w.append(x[lo:hi], x[lo:hi] * 2, ids[lo:hi])
    assert_same_store(tmp_path / "one", tmp_path / "many")


def test_buffered_rows_stay_invisible_until_committed(tmp_path: Path) -> None:
    """A reader sees only committed rows: the partial tail sits in the writer's buffer until close()."""
    url = str(tmp_path / "s")
    store = ActivationStore.create(url, num_layers=2, d_model=3, rows_per_chunk=8)
    w = store.writer()
    w.append(torch.ones(20, 2, 3), torch.ones(20, 2, 3))
    assert w.rows_buffered == 4
    reader = ActivationStore.open(url)
    assert reader.num_rows == 16
    with pytest.raises(IndexError):
        reader.read(0, 17)
    w.close()
    assert ActivationStore.open(url).num_rows == 20


def test_an_empty_chunk_is_still_written(tmp_path: Path) -> None:
    """All-zero rows and unknown (-1) token ids equal the fill values; their chunk objects must exist anyway, so a
    lost chunk can be told from a zero one."""
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=3, rows_per_chunk=4)
    with store.writer() as w:
        w.append(torch.zeros(10, 2, 3), torch.zeros(10, 2, 3))  # token ids default to -1
    for name in ("inputs", "targets", "token_ids"):
        assert len(list((tmp_path / "s" / name / "c").iterdir())) == 3, name
    assert torch.equal(store.read(0, 10).token_ids, torch.full((10,), -1, dtype=torch.int32))


def test_store_metadata_is_recorded(tmp_path: Path) -> None:
    store = ActivationStore.create(
        str(tmp_path / "s"),
        num_layers=2,
        d_model=3,
        model={"name": "gpt2", "revision": "abc"},
        seed=7,
        context_size=128,
    )
    info = ActivationStore.open(str(tmp_path / "s")).info
    assert info.format_version == PLAIN_FORMAT_VERSION  # quantised stores are FORMAT_VERSION (test_quantize.py)
    assert (info.model["name"], info.seed, info.context_size, info.dtype) == ("gpt2", 7, 128, "bfloat16")
    assert info.created_at.startswith("20")
    assert store.rows_per_chunk >= 16


# ------------------------------------------------------------------------------------------- crash consistency
def _start_writer(url: str, mode: str, hang_at: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, __file__, url, mode, str(hang_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )


def _read_until(proc: subprocess.Popen, predicate: object, timeout: float = 60) -> list[str]:
    """Lines of the writer's stdout up to the first that satisfies `predicate`."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"writer exited early ({proc.wait()}): {proc.stderr.read()[-2000:]}")
        lines.append(line.strip())
        if predicate(line.strip()):  # type: ignore[operator]
            return lines
    pytest.fail(f"writer did not get there in {timeout}s: {lines[-5:]}")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def _check_killed_store_then_resume(tmp_path: Path, url: str) -> int:
    """After a SIGKILL: whole chunks visible, every visible row correct, verify passes, and resuming gives exactly
    the store an uninterrupted run writes."""
    from clt_core.data.verify import verify_store

    store = ActivationStore.open(url)
    n = store.num_rows
    assert n % CRASH_RPC == 0  # the writer commits whole chunks only (close() never ran)
    expected = crash_rows(0, n)
    got = store.read(0, n)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b.to(a.dtype))
    report = verify_store(url, progress=False)
    assert report.ok, report.summary()
    write_crash_store(url, start=n, create=False)
    write_crash_store(str(tmp_path / "uninterrupted"))
    assert_same_store(Path(url), tmp_path / "uninterrupted")
    return n


def test_kill_between_chunk_write_and_commit_exposes_only_committed_rows(tmp_path: Path) -> None:
    url = str(tmp_path / "killed")
    proc = _start_writer(url, "hang", hang_at=4)
    try:
        lines = _read_until(proc, lambda line: line.startswith("DATA_WRITTEN"))
    finally:
        _kill(proc)
    committed = [int(line.split()[1]) for line in lines if line.startswith("COMMITTED")]
    assert committed == [CRASH_RPC, 2 * CRASH_RPC, 3 * CRASH_RPC]
    store = ActivationStore.open(url)
    assert store.num_rows == 3 * CRASH_RPC
    # the fourth chunk's data is on disk (and the arrays grew) but it was never committed
    assert (Path(url) / "inputs" / "c" / "3" / "0" / "0").exists()
    assert store.inputs.shape[0] > store.num_rows
    assert _check_killed_store_then_resume(tmp_path, url) == 3 * CRASH_RPC


def test_kill_at_an_arbitrary_moment_leaves_a_consistent_resumable_store(tmp_path: Path) -> None:
    url = str(tmp_path / "killed")
    proc = _start_writer(url, "run")
    try:
        lines = _read_until(proc, lambda line: line == f"COMMITTED {4 * CRASH_RPC}")
        time.sleep(0.037)  # somewhere in the middle of the next appends
    finally:
        _kill(proc)
    assert "DONE" not in lines
    n = _check_killed_store_then_resume(tmp_path, url)
    assert 4 * CRASH_RPC <= n < CRASH_ROWS


# -------------------------------------------------------------------------------------------------- bad input
def _make(tmp_path: Path, **kw: object) -> str:
    url = str(tmp_path / "s")
    store = ActivationStore.create(url, num_layers=2, d_model=3, rows_per_chunk=4, **kw)
    with store.writer() as w:
        w.append(torch.randn(6, 2, 3), torch.randn(6, 2, 3))
    return url


def _edit_info(url: str, **fields: object) -> None:
    group = zarr.open_group(url, mode="r+")
    group.attrs[INFO_KEY] = {**group.attrs[INFO_KEY], **fields}


def test_create_refuses_an_existing_store_unless_overwrite(tmp_path: Path) -> None:
    url = _make(tmp_path)
    with pytest.raises(StoreError, match=r"already exists; pass --overwrite"):
        ActivationStore.create(url, num_layers=2, d_model=3)
    assert ActivationStore.open(url).num_rows == 6  # untouched
    fresh = ActivationStore.create(url, num_layers=4, d_model=5, overwrite=True)
    assert fresh.num_rows == 0 and ActivationStore.open(url).num_layers == 4


def test_create_refuses_bad_geometry(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unsupported dtype 'int8'"):
        ActivationStore.create(str(tmp_path / "a"), num_layers=2, d_model=3, dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="must be positive"):
        ActivationStore.create(str(tmp_path / "b"), num_layers=0, d_model=3)
    with pytest.raises(StoreError, match="invalid store metadata"):
        ActivationStore.create(str(tmp_path / "c"), num_layers=2, d_model=3, seed="not a number")


def test_format_version_mismatch_is_refused(tmp_path: Path) -> None:
    url = _make(tmp_path)
    _edit_info(url, format_version=FORMAT_VERSION + 1)
    with pytest.raises(StoreError, match=rf"format_version {FORMAT_VERSION + 1}, .* reads {FORMAT_VERSION}"):
        ActivationStore.open(url)


def test_array_dtype_contradicting_the_metadata_is_refused(tmp_path: Path) -> None:
    url = _make(tmp_path)  # bfloat16: uint16 arrays
    _edit_info(url, dtype="float32")
    with pytest.raises(StoreError, match=r"'inputs' is stored as uint16 .*metadata says float32"):
        ActivationStore.open(url)


def test_logical_dtype_attribute_contradicting_the_metadata_is_refused(tmp_path: Path) -> None:
    url = _make(tmp_path, dtype="float16")
    zarr.open_group(url, mode="r+")["targets"].attrs["logical_dtype"] = "bfloat16"
    with pytest.raises(StoreError, match=r"'targets' is stored as float16 \(logical bfloat16\), metadata says float16"):
        ActivationStore.open(url)


def test_array_shape_contradicting_the_metadata_is_refused(tmp_path: Path) -> None:
    url = _make(tmp_path)
    _edit_info(url, d_model=4)
    with pytest.raises(StoreError, match=r"'inputs' has shape \(6, 2, 3\), metadata says \[N, 2, 4\]"):
        ActivationStore.open(url)


def test_rows_committed_beyond_the_arrays_is_refused(tmp_path: Path) -> None:
    url = _make(tmp_path)
    _edit_info(url, rows_committed=100)
    with pytest.raises(StoreError, match="rows_committed=100 but the arrays hold only 6 rows; the store is truncated"):
        ActivationStore.open(url)


def test_appending_rows_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    store = ActivationStore.open(_make(tmp_path), mode="a")
    w = store.writer()
    with pytest.raises(StoreError, match=r"do not match the store's \[L, d\] = \[2, 3\]"):
        w.append(torch.zeros(4, 2, 4), torch.zeros(4, 2, 4))  # wrong d_model
    with pytest.raises(StoreError, match=r"do not match the store's \[L, d\] = \[2, 3\]"):
        w.append(torch.zeros(4, 3, 3), torch.zeros(4, 3, 3))  # wrong num_layers
    with pytest.raises(StoreError, match="inputs have 4 rows but targets have 3"):
        w.append(torch.zeros(4, 2, 3), torch.zeros(3, 2, 3))
    with pytest.raises(StoreError, match=r"token_ids has shape \(2,\), expected \(4,\)"):
        w.append(torch.zeros(4, 2, 3), torch.zeros(4, 2, 3), torch.arange(2))
    w.close()
    assert ActivationStore.open(store.url).num_rows == 6  # nothing of the refused appends got in


def test_writing_a_store_opened_read_only_is_refused(tmp_path: Path) -> None:
    store = ActivationStore.open(_make(tmp_path))
    with pytest.raises(StoreError, match="opened read-only; open with mode='a'"):
        store.writer()


def test_a_missing_store_is_reported(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no activation store here \(no zarr.json\); check the URL"):
        ActivationStore.open(str(tmp_path / "nothing"))
    with pytest.raises(StoreError, match="no activation store here"):
        ActivationStore.open(f"file://{tmp_path}/nothing")


def test_a_zarr_group_that_is_not_a_store_is_reported(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "g"), mode="w").create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(StoreError, match="a Zarr group but not an activation store"):
        ActivationStore.open(str(tmp_path / "g"))


def test_a_store_missing_an_array_is_reported(tmp_path: Path) -> None:
    url = _make(tmp_path)
    zarr.open_group(url, mode="r+").__delitem__("token_ids")
    with pytest.raises(StoreError, match="store is missing the 'token_ids' array"):
        ActivationStore.open(url)


@pytest.mark.parametrize("url", ["gs://bucket/store", "http://host/store", "hdfs://x"])
def test_an_unsupported_url_scheme_is_reported(url: str) -> None:
    with pytest.raises(StoreError, match="unsupported URL scheme; use a local path, file://PATH or s3://"):
        ActivationStore.open(url)


def test_invalid_store_metadata_is_reported(tmp_path: Path) -> None:
    url = _make(tmp_path)
    _edit_info(url, num_layers="many")
    with pytest.raises(StoreError, match="invalid 'clt_dataset' metadata"):
        ActivationStore.open(url)


def test_store_metadata_that_is_not_a_mapping_is_reported(tmp_path: Path) -> None:
    url = _make(tmp_path)
    zarr.open_group(url, mode="r+").attrs[INFO_KEY] = [1, 2]
    with pytest.raises(StoreError, match="invalid 'clt_dataset' metadata: a list, not a mapping"):
        ActivationStore.open(url)


def test_damaged_norm_stats_are_reported(tmp_path: Path) -> None:
    from clt_core.data.norm_stats import compute_norm_stats

    url = _make(tmp_path)
    zarr.open_group(url, mode="r+").create_array("norm_stats", shape=(1,), dtype="f8")  # where the group belongs
    with pytest.raises(StoreError, match="'norm_stats' is an array where a group belongs; the store is damaged"):
        ActivationStore.open(url).read_norm_stats()
    zarr.open_group(url, mode="r+").__delitem__("norm_stats")
    compute_norm_stats(ActivationStore.open(url, mode="a"), progress=False)
    zarr.open_group(url, mode="r+")["norm_stats"].attrs["count"] = "many"
    with pytest.raises(StoreError, match="attribute 'count' of 'norm_stats' is 'many', not an integer"):
        ActivationStore.open(url).read_norm_stats()


def test_store_info_keeps_unknown_fields() -> None:
    """Newer writers may add fields; this reader keeps them rather than dropping them on the next commit."""
    info = StoreInfo(num_layers=1, d_model=2, dtype="float32", tokenizer="gpt2")
    assert info.model_dump()["tokenizer"] == "gpt2"


if __name__ == "__main__":
    _writer_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))


@pytest.mark.parametrize("overwrite", [False, True])
def test_create_never_clears_a_directory_that_is_not_a_store(tmp_path: Path, overwrite: bool) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.create(str(target), num_layers=2, d_model=4, overwrite=overwrite)
    assert (target / "precious.txt").read_text() == "mine"


def test_create_refuses_metadata_the_store_owns(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="rows_committed"):
        ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=4, rows_committed=5)


def test_writer_keeps_no_reference_to_rows_the_caller_reuses(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=4, dtype="float32", rows_per_chunk=8)
    block = torch.zeros(5, 2, 4)
    expected = []
    with store.writer() as w:
        for i in range(7):  # 35 rows: buffered remainders sit in the writer between appends
            block.fill_(float(i))
            expected.append(block.clone())
            w.append(block, block, torch.arange(5 * i, 5 * i + 5))
    assert torch.equal(ActivationStore.open(store.url).read(0, 35).inputs, torch.cat(expected))


def test_reading_a_corrupt_chunk_is_a_store_error_that_points_to_verify(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=4, rows_per_chunk=8)
    with store.writer() as w:
        w.append(torch.randn(24, 2, 4), torch.randn(24, 2, 4), torch.arange(24))
    chunk = tmp_path / "s" / "inputs" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    reopened = ActivationStore.open(store.url)
    assert torch.equal(reopened.read(0, 8).token_ids, torch.arange(8, dtype=torch.int32))  # other chunks still read
    with pytest.raises(StoreError, match=r"rows 8\.\.16 cannot be decoded.*clt verify"):
        reopened.read(8, 16)


def test_require_refuses_a_store_of_other_geometry(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=4)
    store.require(num_layers=2, d_model=4, dtype="bfloat16")
    with pytest.raises(StoreError, match="d_model=4, but 8 is expected"):
        store.require(d_model=8)
    with pytest.raises(StoreError, match="num_layers=2, but 3"):
        store.require(num_layers=3)


def test_exist_ok_completes_a_store_whose_creation_was_cut_short(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    geometry = {"num_layers": 2, "d_model": 3, "dtype": "float32", "rows_per_chunk": 8}
    ActivationStore.create(url, **geometry)
    for name in ("targets", "token_ids"):  # what a kill after the first array leaves
        shutil.rmtree(tmp_path / "s" / name)
    with pytest.raises(StoreError, match="missing the 'targets' array"):
        ActivationStore.open(url)
    store = ActivationStore.create(url, **geometry, exist_ok=True)
    with store.writer() as w:
        w.append(torch.ones(10, 2, 3), torch.zeros(10, 2, 3))
    # An existing store is returned as it is, rows and all.
    again = ActivationStore.create(url, **geometry, exist_ok=True)
    assert again.num_rows == 10 and torch.equal(again.read(0, 10).inputs, torch.ones(10, 2, 3))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.create(str(tmp_path / "other"), **geometry, exist_ok=True)


def test_a_kill_between_resizing_the_arrays_loses_no_rows(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    x = torch.randn(40, 2, 3)
    store = ActivationStore.create(url, num_layers=2, d_model=3, dtype="float32", rows_per_chunk=8)
    w = store.writer()
    w.append(x[:16], -x[:16], torch.arange(16))  # two whole chunks committed
    store.inputs.resize((64, 2, 3))  # the writer grew `inputs` and was killed before growing the others
    again = ActivationStore.open(url, "a")
    assert again.num_rows == 16
    with again.writer() as w:
        w.append(x[16:], -x[16:], torch.arange(16, 40))
    rows = ActivationStore.open(url).read(0, 40)
    assert torch.equal(rows.targets, -x) and torch.equal(rows.token_ids, torch.arange(40, dtype=torch.int32))
    assert all(a.shape[0] == 40 for a in (again.inputs, again.targets, again.token_ids))


def test_require_group_tolerates_a_group_made_meanwhile_by_another_process(tmp_path: Path) -> None:
    import zarr
    from zarr.errors import ContainsGroupError

    from clt_core.data.layout import require_group

    root = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)

    class RacedParent:  # what two shards finishing at once on S3 saw: the group appears between check and write
        def require_group(self, name: str) -> zarr.Group:
            root.require_group(name)
            raise ContainsGroupError(name)

        def __getitem__(self, name: str) -> zarr.Group:
            return root[name]

    assert require_group(RacedParent(), "norm_stats").path == "norm_stats"


def test_norm_stats_written_by_many_finishers_at_once_never_fail(tmp_path: Path) -> None:
    """Shards that finish together all write the same norm stats: writes race, none may fail (the arrays were once
    deleted and re-made by each writer, so another writer's chunk rename found no directory)."""
    from concurrent.futures import ThreadPoolExecutor

    from clt_core.data.norm_stats import NormStats

    url = str(tmp_path / "s")
    ActivationStore.create(url, num_layers=3, d_model=8, dtype="float32", rows_per_chunk=4)
    stats = NormStats(10, *(np.full((3, 8), float(i + 1)) for i in range(4)))

    def write(_: int) -> None:
        ActivationStore.open(url, mode="a").write_norm_stats(stats)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(200)))  # raises the first writer's error, if any
    got = ActivationStore.open(url).read_norm_stats()
    assert got.count == 10 and all(np.array_equal(getattr(got, n), getattr(stats, n)) for n in NormStats.ARRAYS)


def test_exist_ok_tolerates_a_store_made_meanwhile_by_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What two shards starting together on S3 saw: the group appears between zarr's check and its write."""
    from zarr.errors import ContainsGroupError

    url = str(tmp_path / "s")
    geometry = {"num_layers": 2, "d_model": 4, "dtype": "float32", "rows_per_chunk": 8}
    ActivationStore.create(url, **geometry)  # the other shard's
    real = zarr.open_group

    def raced(store: object, *, mode: str = "a", **kw: object) -> zarr.Group:
        if mode == "a":
            raise ContainsGroupError("A group exists in store")
        return real(store, mode=mode, **kw)

    monkeypatch.setattr(zarr, "open_group", raced)
    store = ActivationStore.create(url, exist_ok=True, **geometry)
    assert (store.num_layers, store.d_model) == (2, 4)
