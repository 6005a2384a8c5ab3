"""Norm stats: one streaming float64 pass must equal numpy's two-pass mean/std, however the rows are split among
workers (Chan's merge), and survive a trip through the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from clt_core.data.norm_stats import NormStats, NormStatsAccumulator, RunningMoments, compute_norm_stats
from clt_core.data.store import ActivationStore
from clt_core.errors import StoreError

L, D = 3, 5


def offset_rows(n: int, seed: int = 0) -> torch.Tensor:
    """Rows with a large per-layer offset and a small spread: naive sum-of-squares variance loses digits here."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.tensor([1e3, -50.0, 0.0]).reshape(1, L, 1)
    scale = torch.linspace(0.01, 3.0, L * D, dtype=torch.float64).reshape(1, L, D)
    return offset + scale * torch.randn(n, L, D, generator=gen, dtype=torch.float64)


def make_store(tmp_path: Path, dtype: str = "float32", n: int = 203, rows_per_chunk: int = 16) -> ActivationStore:
    x = offset_rows(n, seed=1)
    y = offset_rows(n, seed=2) * 0.5
    store = ActivationStore.create(
        str(tmp_path / "s"), num_layers=L, d_model=D, dtype=dtype, rows_per_chunk=rows_per_chunk
    )
    with store.writer() as w:
        w.append(x, y)
    return ActivationStore.open(store.url, mode="a")


def numpy_stats(store: ActivationStore) -> dict[str, np.ndarray]:
    """The reference: numpy's float64 mean and population std over the stored (rounded) values."""
    rows = store.read(0, store.num_rows)
    x = rows.inputs.to(torch.float64).numpy()
    y = rows.targets.to(torch.float64).numpy()
    return {
        "inputs_mean": x.mean(axis=0),
        "inputs_std": x.std(axis=0),
        "targets_mean": y.mean(axis=0),
        "targets_std": y.std(axis=0),
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_compute_norm_stats_matches_numpy_float64(tmp_path: Path, dtype: str) -> None:
    store = make_store(tmp_path, dtype=dtype)
    stats = compute_norm_stats(store, workers=2, progress=False)
    assert stats.count == 203
    for name, ref in numpy_stats(store).items():
        got = getattr(stats, name)
        assert got.dtype == np.float64 and got.shape == (L, D)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    "sizes",
    [[100, 1, 99], [0, 200], [200, 0], [1] * 5 + [195], [37, 0, 0, 63, 100], [3, 197]],
    ids=["uneven", "empty-first", "empty-last", "singletons", "empty-middle", "tiny-first"],
)
def test_chan_merge_of_partitions_equals_one_pass(sizes: list[int]) -> None:
    x = offset_rows(sum(sizes))
    whole = RunningMoments.of(x)
    merged = RunningMoments.empty(L, D)
    at = 0
    for n in sizes:
        merged = merged.merge(RunningMoments.of(x[at : at + n]))
        at += n
    assert merged.count == whole.count == 200
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.std, whole.std, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.std, x.numpy().std(axis=0), rtol=1e-12)


def test_merge_order_does_not_matter() -> None:
    x = offset_rows(90)
    a, b, c = (RunningMoments.of(part) for part in (x[:10], x[10:55], x[55:]))
    left = a.merge(b).merge(c)
    right = c.merge(a.merge(b))
    np.testing.assert_allclose(left.mean, right.mean, rtol=1e-13)
    np.testing.assert_allclose(left.m2, right.m2, rtol=1e-12)


def test_streaming_updates_equal_one_block() -> None:
    x, y = offset_rows(64, seed=3), offset_rows(64, seed=4)
    acc = NormStatsAccumulator(L, D)
    for lo in range(0, 64, 13):
        acc.update(x[lo : lo + 13], y[lo : lo + 13])
    other = NormStatsAccumulator(L, D)
    other.update(x, y)
    a, b = acc.result(), other.result()
    assert a.count == b.count == 64
    for name in NormStats.ARRAYS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12)


def test_merge_with_nothing_returns_a_copy() -> None:
    """Merging an empty partial result must not alias the other's arrays (a later update would corrupt both)."""
    a = RunningMoments.of(offset_rows(5))
    merged = a.merge(RunningMoments.empty(L, D))
    merged.mean[...] = 0
    assert not np.all(a.mean == 0)


def test_empty_moments_have_zero_std() -> None:
    assert np.all(RunningMoments.empty(L, D).std == 0)
    assert RunningMoments.of(np.zeros((0, L, D), np.float32)).count == 0


@pytest.mark.timeout(60)  # regression: 8+ workers used to deadlock the store's shared thread pool
def test_worker_counts_agree(tmp_path: Path) -> None:
    store = make_store(tmp_path, n=300, rows_per_chunk=8)  # 38 chunks: uneven ranges for 3 workers
    one = compute_norm_stats(store, workers=1, progress=False)
    three = compute_norm_stats(store, workers=3, progress=False)
    many = compute_norm_stats(store, workers=64, progress=False)  # more workers than chunks
    for name in NormStats.ARRAYS:
        np.testing.assert_allclose(getattr(three, name), getattr(one, name), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-12, atol=1e-12)
    assert one.count == three.count == many.count == 300


def test_norm_stats_are_stored_and_read_back(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert store.read_norm_stats() is None
    stats = compute_norm_stats(store, workers=2, progress=False)
    back = ActivationStore.open(store.url).read_norm_stats()
    assert back is not None and back.count == 203
    for name in NormStats.ARRAYS:
        assert getattr(back, name).dtype == np.float64
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))
    # recomputing after an append replaces them
    with store.writer() as w:
        w.append(torch.zeros(7, L, D), torch.zeros(7, L, D))
    compute_norm_stats(store, workers=2, progress=False)
    assert ActivationStore.open(store.url).read_norm_stats().count == 210


def test_norm_stats_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    bad = NormStats(1, *(np.zeros((L, D + 1)) for _ in range(4)))
    with pytest.raises(StoreError, match=r"norm stat inputs_mean has shape \(3, 6\), the store needs \(3, 5\)"):
        store.write_norm_stats(bad)


def test_incomplete_norm_stats_are_reported(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    compute_norm_stats(store, workers=1, progress=False)
    del zarr.open_group(store.url, mode="r+")["norm_stats"]["targets_std"]
    with pytest.raises(StoreError, match="norm_stats is incomplete"):
        ActivationStore.open(store.url).read_norm_stats()


def test_an_empty_store_has_no_norm_stats_to_compute(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "e"), num_layers=L, d_model=D)
    with pytest.raises(StoreError, match="no committed rows; nothing to compute norm stats from"):
        compute_norm_stats(store, progress=False)
