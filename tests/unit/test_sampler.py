import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.sampler import ActivationSampler, SamplerConfig, held_out_batches, held_out_range, split_chunks
from clt_core.data.store import ActivationStore
from clt_core.errors import StoreError

ROWS, CHUNK, L, D = 1000, 64, 2, 4  # 16 chunks, the last one partial (40 rows)


def write_store(url: str, rows: int = ROWS, chunk: int = CHUNK) -> ActivationStore:
    """Row i has token id i and inputs equal to i everywhere, so every row can be identified and checked."""
    store = ActivationStore.create(url, num_layers=L, d_model=D, dtype="float32", rows_per_chunk=chunk)
    ids = torch.arange(rows)
    values = ids.float()[:, None, None].expand(rows, L, D)
    with store.writer() as w:
        w.append(values, -values, ids)
    return ActivationStore.open(url)


@pytest.fixture
def store(tmp_path: Path) -> ActivationStore:
    return write_store(str(tmp_path / "store"))


def raw(**kw: object) -> SamplerConfig:
    return SamplerConfig(**{"batch_size": 100, "buffer_chunks": 4, "normalization_method": "none", **kw})


def take(sampler: ActivationSampler, n: int) -> list[torch.Tensor]:
    return [next(sampler).token_ids.clone() for _ in range(n)]


def test_rows_stay_intact_and_batches_have_the_requested_size(store: ActivationStore) -> None:
    with ActivationSampler(store, raw(batch_size=37)) as sampler:
        for _ in range(30):  # crosses windows and the epoch boundary
            batch = next(sampler)
            assert batch.inputs.shape == (37, L, D) and batch.inputs.dtype == torch.float32
            ids = batch.token_ids.float()[:, None, None]
            assert torch.equal(batch.inputs, ids.expand(-1, L, D))
            assert torch.equal(batch.targets, -ids.expand(-1, L, D))


def test_each_epoch_visits_every_training_row_exactly_once(store: ActivationStore) -> None:
    with ActivationSampler(store, raw(batch_size=100)) as sampler:
        first, second = torch.cat(take(sampler, 10)), torch.cat(take(sampler, 10))
    assert sorted(first.tolist()) == list(range(ROWS))
    assert sorted(second.tolist()) == list(range(ROWS))
    assert not torch.equal(first, second), "the second epoch should be ordered differently"


def test_a_batch_mixes_rows_from_several_chunks(store: ActivationStore) -> None:
    with ActivationSampler(store, raw(batch_size=64, buffer_chunks=4)) as sampler:
        batch = next(sampler).token_ids
    chunks_in_batch = set((batch // CHUNK).tolist())
    assert len(chunks_in_batch) >= 3
    assert not torch.equal(batch, batch.sort().values), "rows inside a batch are shuffled"


def test_same_seed_same_batches_other_seed_other_batches(store: ActivationStore) -> None:
    with ActivationSampler(store, raw(seed=3)) as a, ActivationSampler(store, raw(seed=3)) as b:
        assert all(torch.equal(x, y) for x, y in zip(take(a, 12), take(b, 12), strict=True))
    with ActivationSampler(store, raw(seed=3)) as a, ActivationSampler(store, raw(seed=4)) as b:
        assert not torch.equal(torch.cat(take(a, 3)), torch.cat(take(b, 3)))


@pytest.mark.parametrize("done", [0, 3, 9, 10, 23])
def test_resume_from_state_dict_gives_the_same_batches(store: ActivationStore, done: int) -> None:
    with ActivationSampler(store, raw()) as reference:
        expected = take(reference, done + 8)[done:]
    with ActivationSampler(store, raw()) as first:
        take(first, done)
        state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as plain data
    with ActivationSampler(store, raw()) as resumed:
        resumed.load_state_dict(state)
        got = take(resumed, 8)
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))


def counting_reads(store: ActivationStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first row of every read of `store`, in the order made (reads of one window run concurrently)."""
    reads: list[int] = []
    real = store.read

    def read(start: int, stop: int, **kw: object) -> object:
        reads.append(start)
        return real(start, stop, **kw)

    monkeypatch.setattr(store, "read", read)
    return reads


def settle(reads: list[int]) -> int:
    """The number of reads once the background thread has stopped making more."""
    seen = -1
    while seen != len(reads):
        seen = len(reads)
        time.sleep(0.3)
    return seen


def test_windows_are_read_at_most_prefetch_windows_ahead(store: ActivationStore, monkeypatch) -> None:
    reads = counting_reads(store, monkeypatch)
    with ActivationSampler(store, raw(prefetch_windows=1)) as sampler:
        next(sampler)
        assert settle(reads) == 8  # the window sampled from (4 chunks) and one window ahead
        take(sampler, 2)  # rows 100..299: the second window (from row 256) is taken, so the third is read
        assert settle(reads) == 12


def test_no_window_is_read_ahead_past_the_limit_and_batches_past_it_are_still_served(
    store: ActivationStore, monkeypatch
) -> None:
    with ActivationSampler(store, raw()) as reference:
        expected = take(reference, 12)
    reads = counting_reads(store, monkeypatch)
    with ActivationSampler(store, raw()) as sampler:
        sampler.read_ahead_until(300)  # 3 batches: rows 0..299 lie in the first two windows (256 rows each)
        got = take(sampler, 3)
        assert settle(reads) == 8
        got += take(sampler, 9)  # past the limit: read on demand, the same stream
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))


def test_state_is_small_whatever_the_store_size(tmp_path: Path) -> None:
    small = write_store(str(tmp_path / "small"), rows=200)
    large = write_store(str(tmp_path / "large"), rows=20_000)
    sizes = []
    for store in (small, large):
        with ActivationSampler(store, raw()) as sampler:
            take(sampler, 5)
            sizes.append(len(json.dumps(sampler.state_dict())))
    assert max(sizes) < 400
    assert abs(sizes[0] - sizes[1]) < 20


def test_state_from_other_settings_is_refused(store: ActivationStore) -> None:
    with ActivationSampler(store, raw(seed=1)) as a:
        state = a.state_dict()
    with ActivationSampler(store, raw(seed=2)) as b, pytest.raises(StoreError, match="seed"):
        b.load_state_dict(state)


def test_holdout_rows_are_never_trained_on_and_read_in_order(store: ActivationStore) -> None:
    config = raw(holdout_fraction=0.1)
    _, held = split_chunks(store.num_chunks, 0.1)
    assert len(held) == 2
    with ActivationSampler(store, config) as sampler:
        seen = set(torch.cat(take(sampler, 25)).tolist())
    rows = held_out_range(store, 0.1)
    batches = held_out_batches(store, None, rows=rows, sampler=config, batch_size=30)
    held_ids = torch.cat([b.token_ids for b in batches])
    first_held_row = held.start * CHUNK
    assert held_ids.tolist() == list(range(first_held_row, ROWS))
    assert seen == set(range(first_held_row))


def test_held_out_batches_read_a_row_range_across_chunks(store: ActivationStore) -> None:
    start, _ = held_out_range(store, 0.2)
    sampler = raw(dtype="bfloat16")
    batches = list(held_out_batches(store, None, rows=(start + 5, start + 125), sampler=sampler, batch_size=50))
    assert [len(b.token_ids) for b in batches] == [50, 50, 20]
    assert torch.cat([b.token_ids for b in batches]).tolist() == list(range(start + 5, start + 125))
    assert {b.inputs.dtype for b in batches} == {torch.bfloat16}


def test_ranks_read_disjoint_rows_that_cover_the_epoch(store: ActivationStore) -> None:
    per_rank = []
    for rank in range(2):
        with ActivationSampler(store, raw(batch_size=50, buffer_chunks=2), rank=rank, world_size=2) as s:
            per_rank.append(torch.cat(take(s, 9)))  # 450 rows: within the first epoch of each rank
    a, b = (set(t.tolist()) for t in per_rank)
    assert not a & b
    assert a | b <= set(range(ROWS))
    assert len(a) == 450 and len(b) == 450


def test_too_many_ranks_for_the_windows_is_a_clear_error(store: ActivationStore) -> None:
    with pytest.raises(StoreError, match="fewer than world_size"):
        ActivationSampler(store, raw(buffer_chunks=8), rank=0, world_size=3)


def test_normalisation_uses_the_store_norm_stats(tmp_path: Path) -> None:
    from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store

    store = make_synthetic_store(str(tmp_path / "syn"), SyntheticConfig(rows=4096, num_layers=2, d_model=8))
    with pytest.raises(StoreError, match="norm-stats"):
        ActivationSampler(store, SamplerConfig(normalization_method="mean_std"))
    with ActivationSampler(store, SamplerConfig(batch_size=4096)) as sampler:  # auto, no stats: raw values
        assert sampler.normalizer is None
    compute_norm_stats(ActivationStore.open(store.url, "a"), progress=False)
    store = ActivationStore.open(store.url)
    with ActivationSampler(store, SamplerConfig(batch_size=4096)) as sampler:
        batch = next(sampler)  # the whole store: mean 0 and std 1 per layer and dimension
    for x in (batch.inputs, batch.targets):
        assert np.allclose(x.double().mean(0).numpy(), 0, atol=1e-2)
        assert np.allclose(x.double().std(0, unbiased=False).numpy(), 1, atol=1e-2)


def test_bfloat16_store_gives_bit_exact_rows_without_normalisation(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "bf"), num_layers=L, d_model=D, rows_per_chunk=16)
    x = torch.randn(100, L, D)
    with store.writer() as w:
        w.append(x, x * 2, torch.arange(100))
    config = SamplerConfig(batch_size=10, buffer_chunks=2, normalization_method="none", dtype="bfloat16")
    with ActivationSampler(ActivationStore.open(store.url), config) as sampler:
        batch = next(sampler)
    assert batch.inputs.dtype == torch.bfloat16
    assert torch.equal(batch.inputs, x.bfloat16()[batch.token_ids.long()])


def test_empty_store_is_refused(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "empty"), num_layers=L, d_model=D)
    with pytest.raises(StoreError, match="no committed rows"):
        ActivationSampler(store, raw())


@pytest.mark.s3
def test_sampler_on_s3_matches_the_local_copy(tmp_path: Path, s3_url: str) -> None:
    local = write_store(str(tmp_path / "local"))
    remote = write_store(s3_url)
    with ActivationSampler(local, raw()) as a, ActivationSampler(remote, raw()) as b:
        for x, y in zip(take(a, 12), take(b, 12), strict=True):
            assert torch.equal(x, y)


def test_batches_come_in_the_store_dtype_unless_asked_otherwise(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "bf"), num_layers=L, d_model=D, rows_per_chunk=16)
    with store.writer() as w:
        w.append(torch.randn(64, L, D), torch.randn(64, L, D), torch.arange(64))
    store = ActivationStore.open(store.url)
    with ActivationSampler(store, SamplerConfig(batch_size=8, buffer_chunks=2)) as sampler:
        assert next(sampler).inputs.dtype == torch.bfloat16
    with ActivationSampler(store, SamplerConfig(batch_size=8, buffer_chunks=2, dtype="float32")) as sampler:
        assert next(sampler).inputs.dtype == torch.float32
