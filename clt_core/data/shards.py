"""Parallel writers of one store: shard i of n fills one chunk-aligned range of rows of a pre-sized store.

A parallel extraction (`clt extract --shard i/n`) writes exactly the rows of the unsharded one: shard i takes the
stream's rows [start_i, stop_i), where the bounds split the store's chunks evenly. Shards never write the same
object: each keeps its own progress record, the subgroup `shards/{i}-of-{n}`, whose attributes say how many of its
rows are written (a killed shard resumes there) and which, once the shard is done, holds its norm-stat moments.
Whichever shard finds all n done merges the moments in shard order (Chan's update, exact up to float64 rounding)
and commits every row at once by setting `rows_committed`; until then readers see an empty store. Finishing is
idempotent, so two shards that finish together both write the same result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import zarr

from clt_core.data.layout import child_array, child_group, int_attr, require_group
from clt_core.data.norm_stats import NormStats, NormStatsAccumulator, RunningMoments
from clt_core.data.storage import storage_errors
from clt_core.data.store import ActivationStore
from clt_core.errors import ConfigError, StoreError

GROUP = "shards"
_MOMENTS = ("inputs_mean", "inputs_m2", "targets_mean", "targets_m2")


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: the index must be in 0..{self.count - 1}")

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """`"i/n"`, e.g. `"0/4"` for the first of four shards."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if match is None:
            raise ConfigError(f"--shard {spec!r}: write it as i/n, e.g. 0/4 for the first of four shards")
        return cls(int(match[1]), int(match[2]))

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def rows(self, total_rows: int, rows_per_chunk: int) -> tuple[int, int]:
        """The shard's row range [start, stop): whole chunks, split as evenly as chunks allow (it may be empty
        when there are more shards than chunks)."""
        chunks = -(-total_rows // rows_per_chunk)
        first = self.index * chunks // self.count
        last = (self.index + 1) * chunks // self.count
        return min(first * rows_per_chunk, total_rows), min(last * rows_per_chunk, total_rows)


@dataclass
class ShardProgress:
    """What a shard's record says."""

    start: int
    stop: int
    rows_done: int = 0
    done: bool = False


def _records(store: ActivationStore) -> zarr.Group:
    return require_group(store.group, GROUP)


def read_progress(store: ActivationStore, shard: Shard) -> ShardProgress | None:
    """The shard's record, or None if it never committed anything."""
    with storage_errors(store.url, f"read the progress of shard {shard.name}"):
        if GROUP not in store.group or shard.name not in (records := child_group(store.group, GROUP, store.url)):
            return None
        record = child_group(records, shard.name, store.url)
    if "rows_done" not in record.attrs:  # the record's group is made before its first attributes are written
        return None
    start, stop, rows_done = (int_attr(record, key, store.url) for key in ("start", "stop", "rows_done"))
    done = record.attrs.get("done")
    if not isinstance(done, bool):
        raise StoreError(f"{store.url}: shard record {record.path} says done={done!r}, not true or false")
    return ShardProgress(start, stop, rows_done, done)


def record_progress(store: ActivationStore, shard: Shard, progress: ShardProgress) -> None:
    """Write the shard's record (one atomic metadata write)."""
    with storage_errors(store.url, f"record the progress of shard {shard.name}"):
        group = require_group(_records(store), shard.name)
        group.update_attributes(vars(progress))  # attrs.update would write once per key


def record_done(store: ActivationStore, shard: Shard, progress: ShardProgress, stats: NormStatsAccumulator) -> None:
    """Store the shard's moments, then mark it done (in that order, so a done shard always has its moments)."""
    with storage_errors(store.url, f"record shard {shard.name} as done"):
        group = require_group(_records(store), shard.name)
        values = (stats.inputs.mean, stats.inputs.m2, stats.targets.mean, stats.targets.m2)
        for name, value in zip(_MOMENTS, values, strict=True):
            arr = group.create_array(name, shape=value.shape, dtype=np.float64, chunks=value.shape, overwrite=True)
            arr[...] = value
        group.attrs["count"] = int(stats.inputs.count)
    record_progress(store, shard, ShardProgress(progress.start, progress.stop, progress.stop - progress.start, True))


def shards_done(url: str, count: int) -> list[int]:
    """Indices of the shards of an n-shard extraction that are done (read fresh from storage)."""
    store = ActivationStore.open(url)
    return [i for i in range(count) if (p := read_progress(store, Shard(i, count))) is not None and p.done]


def finish(url: str, count: int, total_rows: int) -> tuple[int, NormStats | None]:
    """If all `count` shards are done: merge their moments, write the norm stats and commit all `total_rows` rows.
    Returns how many shards are done, and the stats (None while shards are still running). Safe to call any number
    of times, from any shard."""
    done = len(shards_done(url, count))
    if done < count:
        return done, None
    store = ActivationStore.open(url, mode="a")
    acc = NormStatsAccumulator(store.num_layers, store.d_model)
    with storage_errors(store.url, "merge the shards' norm stats"):
        for i in range(count):
            group = child_group(child_group(store.group, GROUP, store.url), Shard(i, count).name, store.url)
            n = int_attr(group, "count", store.url)
            mean_in, m2_in, mean_tg, m2_tg = (np.asarray(child_array(group, name, store.url)[...]) for name in _MOMENTS)
            acc = acc.merge(
                NormStatsAccumulator.of_moments(RunningMoments(n, mean_in, m2_in), RunningMoments(n, mean_tg, m2_tg))
            )
    stats = acc.result()
    if stats.count != total_rows:
        raise StoreError(f"{url}: the shards hold {stats.count:,} rows, {total_rows:,} were planned")
    store.write_norm_stats(stats)
    store.update_info(rows_committed=total_rows)
    return count, stats


def describe_progress(store: ActivationStore) -> str | None:
    """One line on an unfinished sharded write (None for any other store)."""
    with storage_errors(store.url, "read the shards' progress"):
        names = list(child_group(store.group, GROUP, store.url).group_keys()) if GROUP in store.group else []
    if not names or store.num_rows > 0:
        return None
    count = int(names[0].split("-of-")[1])
    records = [read_progress(store, Shard(i, count)) for i in range(count)]
    done = sum(1 for r in records if r is not None and r.done)
    written = sum(r.rows_done for r in records if r is not None)
    planned = int(store.inputs.shape[0])
    return (
        f"sharded write under way: {done} of {count} shards done, {written:,} of {planned:,} rows written; "
        "the rows are committed when the last shard finishes"
    )
