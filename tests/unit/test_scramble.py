"""The out-of-core scramble: a seeded permutation of every committed row into a new store, within a memory budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import clt_core.data.scramble as sc
from clt_core.cli import main as clt
from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.scramble import ScrambleConfig, permutation, plan_scramble, scramble_store
from clt_core.data.store import ActivationStore
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.errors import StoreError

ROWS, CHUNK = 1000, 64  # 15 full chunks and a partial one of 40 rows


def make_store(url: str, rows: int = ROWS, chunk: int = CHUNK, **kw: object) -> ActivationStore:
    """A small synthetic store; its token ids are the row indices, so every row is identifiable."""
    return make_synthetic_store(url, SyntheticConfig(rows=rows, rows_per_chunk=chunk, num_features=32, **kw))


def read_all(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    store = ActivationStore.open(url)
    return store.read_storage(0, store.num_rows)


def assert_permutation_of(src_url: str, dst_url: str) -> np.ndarray:
    """Every source row exactly once in the destination, bit-identical; returns the destination's token ids."""
    x, y, ids = read_all(src_url)
    ox, oy, oids = read_all(dst_url)
    assert np.array_equal(np.sort(oids), ids)  # ids are 0..N-1: each exactly once
    np.testing.assert_array_equal(ox, x[oids])  # storage dtype (bf16 bits as uint16): bit-identical
    np.testing.assert_array_equal(oy, y[oids])
    return oids


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_store(str(tmp_path_factory.mktemp("scramble") / "src")).url


def cfg(**kw: object) -> ScrambleConfig:
    return ScrambleConfig(**kw)


# ------------------------------------------------------------------------------------------- the permutation
def test_every_row_exactly_once_and_bit_identical(src: str, tmp_path: Path) -> None:
    summary = scramble_store(src, str(tmp_path / "dst"), cfg(seed=3), progress=False)
    oids = assert_permutation_of(src, str(tmp_path / "dst"))
    assert summary.rows == ROWS and summary.bytes == ROWS * ActivationStore.open(src).row_bytes
    # The documented placement: source row i lands at permutation(N, seed)[i].
    assert np.array_equal(oids[permutation(ROWS, 3)], np.arange(ROWS))


def test_order_is_shuffled_across_source_chunks(src: str, tmp_path: Path) -> None:
    scramble_store(src, str(tmp_path / "dst"), cfg(seed=0), progress=False)
    _, _, oids = read_all(str(tmp_path / "dst"))
    assert not np.array_equal(oids, np.arange(ROWS))
    first_chunk_sources = np.unique(oids[:CHUNK] // CHUNK)
    assert len(first_chunk_sources) >= 10  # one output chunk draws from most of the 16 source chunks
    assert abs(np.corrcoef(oids, np.arange(ROWS))[0, 1]) < 0.15


def test_same_seed_same_store_other_seed_other_order(src: str, tmp_path: Path) -> None:
    a, b, c = (str(tmp_path / n) for n in "abc")
    scramble_store(src, a, cfg(seed=7), progress=False)
    scramble_store(src, b, cfg(seed=7, workers=1, memory_budget="40MB"), progress=False)  # budget-independent
    scramble_store(src, c, cfg(seed=8), progress=False)
    for left, right in zip(read_all(a), read_all(b), strict=True):
        np.testing.assert_array_equal(left, right)
    assert not np.array_equal(read_all(a)[2], read_all(c)[2])


def test_tiny_budget_forces_many_buckets_and_stays_correct(
    src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sc, "RESERVE_BYTES", 0)  # so a test-sized budget can mean a handful of chunks
    monkeypatch.setattr(sc, "MAX_OPEN_SPILL_FILES", 4)  # and exercise the reopen-per-append path
    config = cfg(seed=1, memory_budget=300_000, rows_per_chunk=16)
    row_bytes = ActivationStore.open(src).row_bytes
    plan = plan_scramble(
        num_rows=ROWS,
        row_bytes=row_bytes,
        src_rows_per_chunk=CHUNK,
        dst_rows_per_chunk=16,
        workers=config.workers,
        budget=300_000,
    )
    assert plan.num_buckets >= 10 and plan.peak_bytes <= 300_000
    summary = scramble_store(src, str(tmp_path / "dst"), config, progress=False)
    assert summary.num_buckets == plan.num_buckets and summary.bucket_rows == plan.bucket_rows
    oids = assert_permutation_of(src, str(tmp_path / "dst"))
    assert np.array_equal(oids[permutation(ROWS, 1)], np.arange(ROWS))  # same order as with one bucket
    assert ActivationStore.open(str(tmp_path / "dst")).rows_per_chunk == 16


# ------------------------------------------------------------------------------------------------- the plan
def test_plan_fits_budget_and_aligns_buckets_to_chunks() -> None:
    kw = {"num_rows": 100_000, "row_bytes": 32_772, "src_rows_per_chunk": 128, "dst_rows_per_chunk": 256}
    small = plan_scramble(**kw, workers=4, budget=512 * 10**6, write_concurrency=10)
    large = plan_scramble(**kw, workers=4, budget=4 * 10**9, write_concurrency=10)
    for plan in (small, large):
        assert plan.bucket_rows % 256 == 0 and plan.slab_rows % 256 == 0
        assert plan.peak_bytes <= plan.budget
        assert plan.num_buckets == -(-100_000 // plan.bucket_rows)
    assert large.bucket_rows > 4 * small.bucket_rows
    assert small.read_window == 4
    whole = plan_scramble(**kw, workers=4, budget=10**11)
    assert whole.num_buckets == 1 and whole.bucket_rows == 100_096  # never more than the store, rounded to chunks
    remote = plan_scramble(**kw, workers=4, budget=512 * 10**6, write_concurrency=10, remote_dst=True)
    assert remote.peak_bytes <= remote.budget and remote.bucket_rows < small.bucket_rows  # S3 uploads hold more


def test_plan_refuses_a_budget_below_one_chunk() -> None:
    with pytest.raises(StoreError, match=r"memory budget .* too small.*--memory-budget"):
        plan_scramble(
            num_rows=1000, row_bytes=32_772, src_rows_per_chunk=256, dst_rows_per_chunk=256, workers=4, budget=10**6
        )


def test_permutation_is_a_compact_seeded_bijection() -> None:
    p = permutation(10_000, 5)
    assert p.dtype == np.int32
    assert np.array_equal(np.sort(p), np.arange(10_000))
    assert np.array_equal(p, permutation(10_000, 5)) and not np.array_equal(p, permutation(10_000, 6))


# ------------------------------------------------------------------------------------------ metadata, stats
def test_metadata_and_norm_stats_are_carried_over(tmp_path: Path) -> None:
    src = make_store(str(tmp_path / "src"), seed=11)
    stats = compute_norm_stats(ActivationStore.open(src.url, mode="a"), progress=False)
    scramble_store(src.url, "file://" + str(tmp_path / "dst"), cfg(seed=42), progress=False)
    dst = ActivationStore.open(str(tmp_path / "dst"))
    assert dst.info.scrambled and dst.info.parent == src.url and dst.info.seed == 42
    assert dst.num_rows == ROWS and dst.rows_per_chunk == CHUNK and dst.dtype == "bfloat16"
    assert dst.info.model == src.info.model and dst.info.text_dataset == "synthetic"
    copied = dst.read_norm_stats()
    assert copied is not None and copied.count == stats.count == ROWS
    np.testing.assert_array_equal(copied.inputs_mean, stats.inputs_mean)
    np.testing.assert_array_equal(copied.targets_std, stats.targets_std)
    assert dst.inputs.shape[0] == ROWS  # trimmed to the committed rows


def test_source_without_norm_stats_gives_destination_without(src: str, tmp_path: Path) -> None:
    scramble_store(src, str(tmp_path / "dst"), cfg(), progress=False)
    assert ActivationStore.open(str(tmp_path / "dst")).read_norm_stats() is None


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_native_dtypes_are_moved_bit_exactly(dtype: str, tmp_path: Path) -> None:
    src = make_store(str(tmp_path / "src"), rows=300, chunk=32, dtype=dtype)
    scramble_store(src.url, str(tmp_path / "dst"), cfg(seed=2, rows_per_chunk=50), progress=False)
    assert_permutation_of(src.url, str(tmp_path / "dst"))
    assert ActivationStore.open(str(tmp_path / "dst")).dtype == dtype


# ---------------------------------------------------------------------------------------------- refusals
def test_existing_destination_is_refused_unless_overwrite(src: str, tmp_path: Path) -> None:
    dst = str(tmp_path / "dst")
    scramble_store(src, dst, cfg(seed=1), progress=False)
    with pytest.raises(StoreError, match="already exists; pass --overwrite"):
        scramble_store(src, dst, cfg(seed=2), progress=False)
    assert np.array_equal(read_all(dst)[2][permutation(ROWS, 1)], np.arange(ROWS))  # untouched
    scramble_store(src, dst, cfg(seed=2), overwrite=True, progress=False)
    assert np.array_equal(read_all(dst)[2][permutation(ROWS, 2)], np.arange(ROWS))


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_empty_directory_is_refused_even_with_overwrite(src: str, tmp_path: Path, overwrite: bool) -> None:
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not an activation store"):
        scramble_store(src, str(tmp_path / "dst"), cfg(), overwrite=overwrite, progress=False)
    assert (tmp_path / "dst" / "notes.txt").read_text() == "keep me"


def test_source_as_or_around_destination_is_refused(src: str) -> None:
    for dst in (src, "file://" + src + "/", src + "/inner", str(Path(src).parent)):
        with pytest.raises(StoreError, match=r"same store|overlaps"):
            scramble_store(src, dst, cfg(), overwrite=True, progress=False)
    assert ActivationStore.open(src).num_rows == ROWS


def test_budget_below_one_chunk_is_a_clear_error_before_any_write(src: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"too small.*--memory-budget"):
        scramble_store(src, str(tmp_path / "dst"), cfg(memory_budget="1KB"), progress=False)
    assert not (tmp_path / "dst").exists()


def test_temp_disk_too_small_is_refused(src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Usage:
        free = 1000

    monkeypatch.setattr(sc.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(StoreError, match="--tmp-dir"):
        scramble_store(src, str(tmp_path / "dst"), cfg(), progress=False)
    assert not (tmp_path / "dst").exists()


def test_tmp_dir_in_ram_gets_a_warning(src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sc, "_is_ram_backed", lambda _: True)
    with pytest.warns(UserWarning, match="tmpfs"):
        scramble_store(src, str(tmp_path / "dst"), cfg(), progress=False)


def test_missing_tmp_dir_is_refused(src: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        scramble_store(src, str(tmp_path / "dst"), cfg(tmp_dir=str(tmp_path / "nope")), progress=False)


def test_empty_source_is_refused(tmp_path: Path) -> None:
    ActivationStore.create(str(tmp_path / "src"), num_layers=2, d_model=4)
    with pytest.raises(StoreError, match="no committed rows"):
        scramble_store(str(tmp_path / "src"), str(tmp_path / "dst"), cfg(), progress=False)


# ------------------------------------------------------------------------------------- cleanup, progress, CLI
def test_temp_files_removed_after_success_and_failure(
    src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    scramble_store(src, str(tmp_path / "ok"), cfg(tmp_dir=str(spill)), progress=False)
    assert list(spill.iterdir()) == []

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sc, "_gather_pass", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        scramble_store(src, str(tmp_path / "failed"), cfg(tmp_dir=str(spill)), progress=False)
    assert list(spill.iterdir()) == []
    assert not (tmp_path / "failed").exists()  # a partial destination is not left behind


def test_progress_bar_and_summary(src: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = scramble_store(src, str(tmp_path / "a"), cfg(), progress=True)
    assert "scramble" in capsys.readouterr().err
    scramble_store(src, str(tmp_path / "b"), cfg(), progress=False)
    assert capsys.readouterr().err == ""
    text = str(summary)
    assert "1,000 rows" in text and "MB/s" in text and "process peak RSS" in text and summary.peak_rss_bytes > 0


def test_summary_reports_its_buffers_against_the_budget_and_the_process_peak_apart(
    src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget bounds the scramble's buffers; the process's peak RSS (interpreter, torch) is reported beside it."""
    monkeypatch.setattr(sc, "RESERVE_BYTES", 0)  # a test-sized budget that the buffers nearly fill
    budget = 300_000
    summary = scramble_store(src, str(tmp_path / "dst"), cfg(memory_budget=budget, rows_per_chunk=16), progress=False)
    assert 0 < summary.buffer_bytes <= summary.memory_budget == budget < summary.peak_rss_bytes
    buffers, process = str(summary).split("; ")[-2:]
    assert buffers == f"buffers {summary.buffer_bytes / 1e3:.1f} KB of the 300.0 KB budget (planned)"
    assert process.startswith("process peak RSS ") and process.endswith(" (Python, torch and libraries included)")


def test_cli_scramble(src: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = str(tmp_path / "dst")
    argv = ["scramble", src, dst, "--seed", "9", "--memory-budget", "64MB", "--workers", "2", "-q"]
    assert clt(argv) == 0
    assert "scrambled 1,000 rows" in capsys.readouterr().out
    assert np.array_equal(read_all(dst)[2][permutation(ROWS, 9)], np.arange(ROWS))
    assert clt(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert clt([*argv, "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------------- S3
@pytest.mark.s3
def test_local_to_s3(src: str, s3_url: str) -> None:
    scramble_store(src, s3_url, cfg(seed=4, rows_per_chunk=100), progress=False)
    oids = assert_permutation_of(src, s3_url)
    assert np.array_equal(oids[permutation(ROWS, 4)], np.arange(ROWS))
    assert ActivationStore.open(s3_url).info.scrambled


@pytest.mark.s3
def test_s3_to_s3(src: str, s3_url: str) -> None:
    s3_src, s3_dst = s3_url + "-src", s3_url + "-dst"
    scramble_store(src, s3_src, cfg(seed=5), progress=False)  # any store on S3 will do as the source
    scramble_store(s3_src, s3_dst, cfg(seed=6), progress=False)
    assert_permutation_of(src, s3_dst)
    info = ActivationStore.open(s3_dst).info
    assert info.parent == s3_src and info.seed == 6 and info.scrambled
    with pytest.raises(StoreError, match="--overwrite"):
        scramble_store(s3_src, s3_dst, cfg(), progress=False)
