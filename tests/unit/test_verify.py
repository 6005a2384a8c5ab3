"""`verify_store`: a good store passes; every kind of damage is found, located, and reported without a traceback;
warnings (no or stale norm stats, traces of an interrupted write) never fail the check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from clt_core.data.layout import INFO_KEY
from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.store import ActivationStore
from clt_core.data.verify import verify_store

RPC = 8


def make(
    tmp_path: Path,
    dtype: str = "bfloat16",
    n: int = 36,
    compression: str = "zstd",
    norm_stats: bool = True,
    **rows: object,
) -> str:
    """A store of `n` random rows in chunks of 8 (the last one partial), with norm stats unless told otherwise."""
    url = str(tmp_path / "s")
    x = rows.get("inputs", torch.randn(n, 2, 4))
    y = rows.get("targets", torch.randn(n, 2, 4))
    ids = rows.get("token_ids", torch.arange(n))
    store = ActivationStore.create(
        url, num_layers=2, d_model=4, dtype=dtype, rows_per_chunk=RPC, compression=compression
    )
    with store.writer() as w:
        w.append(x, y, ids)
    if norm_stats:
        compute_norm_stats(ActivationStore.open(url, mode="a"), workers=1, progress=False)
    return url


def chunk_file(url: str, array: str, chunk: int) -> Path:
    trail = "/0/0" if array != "token_ids" else ""
    return Path(url) / array / "c" / f"{chunk}{trail}"


def test_a_good_store_passes(tmp_path: Path) -> None:
    url = make(tmp_path)
    report = verify_store(url, progress=False)
    assert report.ok and report.opened and report.scanned
    assert report.problems == [] and report.warnings == []
    assert (report.rows, report.chunks, report.chunks_scanned) == (36, 5, 5)
    assert report.summary().startswith(f"{url}: OK: 36 rows in 5 chunks (2 layers x 4, bfloat16, 8 rows per chunk)")


def test_missing_norm_stats_are_a_warning_not_a_failure(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    store = ActivationStore.create(url, num_layers=2, d_model=4, rows_per_chunk=RPC)
    with store.writer() as w:
        w.append(torch.randn(10, 2, 4), torch.randn(10, 2, 4))
    report = verify_store(url, progress=False)
    assert report.ok
    assert report.warnings == [f"no norm stats; compute them with `clt norm-stats {url}` before training"]
    assert "warning: no norm stats" in report.summary()


def test_stale_norm_stats_are_a_warning(tmp_path: Path) -> None:
    url = make(tmp_path)
    with ActivationStore.open(url, mode="a").writer() as w:
        w.append(torch.randn(3, 2, 4), torch.randn(3, 2, 4))
    report = verify_store(url, progress=False)
    assert report.ok
    assert any("norm stats cover 36 rows but 39 are committed" in w for w in report.warnings)


def test_broken_norm_stats_are_problems(tmp_path: Path) -> None:
    url = make(tmp_path)
    group = zarr.open_group(url, mode="r+")["norm_stats"]
    group["inputs_std"][0, 0] = np.nan
    group["targets_std"][1, 2] = -1.0
    group.create_array("targets_mean", shape=(2, 5), dtype="f8", overwrite=True)
    report = verify_store(url, scan=False, progress=False)
    assert not report.ok
    assert "norm stat inputs_std holds 1 NaN/Inf values" in report.problems
    assert "norm stat targets_std has negative values" in report.problems
    assert "norm stat targets_mean has shape (2, 5), the store needs (2, 4)" in report.problems


def test_incomplete_norm_stats_are_a_problem(tmp_path: Path) -> None:
    url = make(tmp_path)
    del zarr.open_group(url, mode="r+")["norm_stats"]["inputs_mean"]
    report = verify_store(url, progress=False)
    assert not report.ok and any("norm_stats is incomplete" in p for p in report.problems)


def test_a_store_that_cannot_be_opened_is_a_failed_report(tmp_path: Path) -> None:
    report = verify_store(str(tmp_path / "none"), progress=False)
    assert not report.ok and not report.opened
    assert report.problems == [f"{tmp_path / 'none'}: no activation store here (no zarr.json); check the URL"]
    assert "could not be opened" in report.summary()


def test_a_format_version_mismatch_is_a_failed_report(tmp_path: Path) -> None:
    url = make(tmp_path)
    group = zarr.open_group(url, mode="r+")
    group.attrs[INFO_KEY] = {**group.attrs[INFO_KEY], "format_version": 99}
    report = verify_store(url, progress=False)
    assert not report.ok and "store format_version 99" in report.problems[0]


def test_unparseable_metadata_is_a_failed_report_not_a_crash(tmp_path: Path) -> None:
    url = make(tmp_path)
    (Path(url) / "inputs" / "zarr.json").write_text("{ not json")
    report = verify_store(url, progress=False)
    assert not report.ok and not report.opened
    assert len(report.problems) == 1 and url in report.problems[0]


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "append"])
def test_a_damaged_chunk_is_found_and_located(tmp_path: Path, damage: str) -> None:
    url = make(tmp_path)
    path = chunk_file(url, "inputs", 2)
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "overwrite": data[:4] + b"\xa5" * (len(data) - 4), "append": data + b"x"}[
            damage
        ]
    )
    report = verify_store(url, progress=False)
    assert not report.ok
    assert report.bad_chunks == [2]
    assert len(report.problems) == 1
    assert report.problems[0].startswith("chunk 2 (rows 16..23) cannot be decoded: 'inputs': RuntimeError: Zstd")


def test_a_damaged_uncompressed_chunk_is_found(tmp_path: Path) -> None:
    url = make(tmp_path, dtype="float32", compression="none")
    path = chunk_file(url, "targets", 4)  # the partial last chunk
    path.write_bytes(path.read_bytes()[:-6])
    report = verify_store(url, progress=False)
    assert report.bad_chunks == [4]
    assert report.problems[0].startswith("chunk 4 (rows 32..35) cannot be decoded: 'targets': ValueError")


def test_without_scan_chunk_contents_are_not_read(tmp_path: Path) -> None:
    url = make(tmp_path)
    chunk_file(url, "inputs", 1).write_bytes(b"garbage")
    report = verify_store(url, scan=False, progress=False)
    assert report.ok and not report.scanned and report.chunks_scanned == 0
    assert "metadata only" in report.summary()


def test_a_missing_chunk_object_is_found(tmp_path: Path) -> None:
    """Zarr would read a deleted chunk back as zeros without complaint: only the listing notices."""
    url = make(tmp_path)
    chunk_file(url, "targets", 3).unlink()
    chunk_file(url, "token_ids", 0).unlink()
    for scan in (False, True):
        report = verify_store(url, scan=scan, progress=False)
        assert not report.ok
        assert report.bad_chunks == [0, 3]
        assert any(
            "'targets': 1 committed chunk object(s) missing" in p and "chunk 3 (rows 24..31)" in p
            for p in report.problems
        )
        assert any("'token_ids'" in p and "chunk 0 (rows 0..7)" in p for p in report.problems)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_rows_with_nan_or_inf_are_counted_and_listed(tmp_path: Path, dtype: str) -> None:
    x, y = torch.randn(36, 2, 4), torch.randn(36, 2, 4)
    x[3, 1, 2] = float("nan")
    x[17, 0, 0] = float("inf")
    y[17, 1, 3] = float("nan")  # same row twice: counted once
    y[30, 0, 1] = -float("inf")
    x[5] = torch.finfo(getattr(torch, dtype)).max  # huge but finite: fine
    report = verify_store(make(tmp_path, dtype=dtype, norm_stats=False, inputs=x, targets=y), progress=False)
    assert report.nonfinite_rows == 3 and report.nonfinite_examples == [3, 17, 30]
    assert any(p == "3 row(s) hold NaN/Inf in inputs or targets: row 3, 17, 30" for p in report.problems)


def test_many_bad_rows_are_summarised(tmp_path: Path) -> None:
    x = torch.randn(36, 2, 4)
    x[10:30, 0, 0] = float("nan")
    report = verify_store(make(tmp_path, dtype="float32", norm_stats=False, inputs=x), workers=3, progress=False)
    assert report.nonfinite_rows == 20 and report.nonfinite_examples == [10, 11, 12, 13, 14]
    assert "row 10, 11, 12, 13, 14 and 15 more" in report.problems[-1]
    assert report.summary().count("\n") < 6  # a few lines, however much is wrong


def test_many_damaged_chunks_are_summarised(tmp_path: Path) -> None:
    url = make(tmp_path, n=100)  # 13 chunks
    for chunk in range(12):
        chunk_file(url, "inputs", chunk).write_bytes(b"\x00" * 10)
    report = verify_store(url, progress=False)
    assert report.bad_chunks == list(range(12))
    assert len(report.problems) == 6
    assert report.problems[-1] == "… and 7 more chunks that cannot be decoded"


def test_invalid_token_ids_are_a_problem(tmp_path: Path) -> None:
    ids = torch.arange(36)
    ids[[4, 9]] = -7
    report = verify_store(make(tmp_path, token_ids=ids), progress=False)
    assert report.problems == ["2 token id(s) are below -1 (-1 marks an unknown token)"]


def test_a_missing_logical_dtype_attribute_is_a_problem(tmp_path: Path) -> None:
    url = make(tmp_path)
    arr = zarr.open_group(url, mode="r+")["targets"]
    attrs = dict(arr.attrs)
    attrs.pop("logical_dtype")
    arr.attrs.clear()
    arr.attrs.update(attrs)
    report = verify_store(url, progress=False)
    assert not report.ok and "'targets' lacks the array attribute logical_dtype" in report.problems[0]


def test_traces_of_an_interrupted_write_are_warnings(tmp_path: Path) -> None:
    url = make(tmp_path, n=16)
    w = ActivationStore.open(url, mode="a").writer()
    w.append(torch.randn(8, 2, 4), torch.randn(8, 2, 4))  # commits a chunk, doubles the arrays, never closed
    (Path(url) / "inputs" / "c" / "0" / "0" / "0.deadbeef.partial").write_bytes(b"half a chunk")
    report = verify_store(url, progress=False)
    assert report.ok, report.summary()
    assert report.rows == 24
    text = " ".join(report.warnings)
    assert "the arrays are longer than rows_committed=24 (inputs 32, targets 32, token_ids 32)" in text
    assert "leftover *.partial file(s)" in text
    assert "norm stats cover 16 rows but 24 are committed" in text


def test_read_failures_stop_the_scan_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage errors (not decoding errors) are rarely about one chunk: report them and stop, don't hammer."""
    url = make(tmp_path, n=200)

    def unreachable(self: zarr.Array, selection: object) -> None:
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(zarr.Array, "__getitem__", unreachable)
    report = verify_store(url, workers=1, progress=False)
    assert not report.ok
    assert report.chunks_scanned < report.chunks
    assert report.problems[-1].startswith("3 chunk read(s) failed; scan stopped early; last: ")
    assert "connection reset by peer" in report.problems[-1]


def test_parallel_and_serial_scans_agree(tmp_path: Path) -> None:
    x = torch.randn(100, 2, 4)
    x[[7, 50, 99], 1, 1] = float("nan")
    url = make(tmp_path, n=100, norm_stats=False, inputs=x)
    chunk_file(url, "targets", 6).write_bytes(b"junk")
    serial = verify_store(url, workers=1, progress=False)
    parallel = verify_store(url, workers=8, progress=False)
    assert serial.problems == parallel.problems and serial.bad_chunks == parallel.bad_chunks == [6]
    assert serial.nonfinite_examples == parallel.nonfinite_examples == [7, 50, 99]
