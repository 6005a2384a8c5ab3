import numpy as np
import pytest
import torch

from clt_core.data.norm_stats import NormStatsAccumulator, compute_norm_stats
from clt_core.data.store import ActivationStore
from clt_core.extract.writer import BackgroundWriter

L, D, R = 3, 8, 16


def blocks(n_blocks: int, rows: int = 13, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_blocks):
        x = torch.randn(rows, L, D, generator=gen) * 3 + 1
        out.append((x, x.square(), torch.arange(b * rows, (b + 1) * rows)))
    return out


def write(url: str, data: list, start_block: int = 0) -> NormStatsAccumulator:
    store = ActivationStore.open(url, "a")
    stats = NormStatsAccumulator(L, D)
    # A resumed run first folds the committed full chunks from the store, in chunk order.
    full = store.num_rows // R
    for rows in store.iter_chunks(0, full):
        stats.update(rows.inputs, rows.targets)
    writer = BackgroundWriter(store.writer(), stats)
    for block in data[start_block:]:
        writer.put(*block)
    writer.close()
    return stats


@pytest.mark.parametrize(("dtype", "n", "rows"), [("bfloat16", 7, 13), ("float32", 7, 13), ("bfloat16", 6, 5)])
def test_stats_equal_a_separate_pass_bit_for_bit(tmp_path, dtype: str, n: int, rows: int) -> None:
    url = str(tmp_path / "s")
    ActivationStore.create(url, num_layers=L, d_model=D, dtype=dtype, rows_per_chunk=R)
    data = blocks(n, rows=rows)  # 6 blocks of 5 rows leave a 14-row tail chunk made of three blocks
    stats = write(url, data).result()
    store = ActivationStore.open(url, "a")
    assert store.num_rows == n * rows
    assert torch.equal(store.read(0, store.num_rows).token_ids, torch.arange(n * rows, dtype=torch.int32))
    separate = compute_norm_stats(store, workers=1, progress=False)
    for name in ("inputs_mean", "inputs_std", "targets_mean", "targets_std"):
        assert np.array_equal(getattr(stats, name), getattr(separate, name)), name


def test_resumed_writing_gives_identical_rows_and_stats(tmp_path) -> None:
    data = blocks(9)
    whole = str(tmp_path / "whole")
    ActivationStore.create(whole, num_layers=L, d_model=D, rows_per_chunk=R)
    expected = write(whole, data).result()

    resumed = str(tmp_path / "resumed")
    ActivationStore.create(resumed, num_layers=L, d_model=D, rows_per_chunk=R)
    store = ActivationStore.open(resumed, "a")
    writer = store.writer()  # an interrupted run: whole chunks committed, the rest lost
    for block in data[:4]:
        writer.append(*block)
    committed = ActivationStore.open(resumed).num_rows
    assert committed == 48  # 52 rows appended, 3 whole chunks committed
    # The caller resumes at the committed row: here 48 = block 3 row 9.
    rest = [tuple(t[9:] for t in data[3]), *data[4:]]
    got = write(resumed, rest).result()
    a, b = ActivationStore.open(whole), ActivationStore.open(resumed)
    assert torch.equal(a.read(0, a.num_rows).inputs, b.read(0, b.num_rows).inputs)
    for name in ("inputs_mean", "inputs_std", "targets_mean", "targets_std"):
        assert np.array_equal(getattr(expected, name), getattr(got, name)), name


def test_a_write_error_reaches_the_producer(tmp_path) -> None:
    url = str(tmp_path / "s")
    ActivationStore.create(url, num_layers=L, d_model=D, rows_per_chunk=R)
    writer = BackgroundWriter(ActivationStore.open(url, "a").writer(), NormStatsAccumulator(L, D))
    bad = torch.zeros(4, L, D + 1)
    with pytest.raises(Exception, match="do not match"):
        writer.put(bad, bad, torch.arange(4))
        for _ in range(5):
            writer.put(*blocks(1)[0])
        writer.close()
