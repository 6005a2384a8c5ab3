"""Sharded extraction and resume after SIGKILL, through the real `clt extract` command in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import extract_config

from clt_core.data.shards import Shard, ShardProgress, describe_progress, read_progress, record_progress
from clt_core.data.store import ActivationStore, store_exists
from clt_core.data.verify import verify_store
from clt_core.errors import CLTError
from clt_core.extract.extractor import ExtractConfig, extract
from clt_core.lm.corpora import TextConfig

TOKENS = 700
CHUNK = 64


def config(model: Path, **kw: object) -> ExtractConfig:
    base = {"text": TextConfig(source="packaged:kjv", max_documents=60), "tokens": TOKENS, "storage_dtype": "bfloat16"}
    # many small batches: a run long enough to be killed while it writes
    return extract_config(model, **{**base, "batch_size": 1, "chunk_rows": CHUNK, **kw})


def cli_args(cfg: ExtractConfig, out: str) -> list[str]:
    return [
        sys.executable, "-m", "clt_core.cli", "extract", "--quiet", "--out", out, "--model", cfg.model,
        "--text", cfg.text.source, "--tokens", str(cfg.tokens), "--context-size", str(cfg.context_size),
        "--batch-size", str(cfg.batch_size), "--compute-dtype", cfg.compute_dtype,
        "--storage-dtype", cfg.storage_dtype, "--chunk-rows", str(cfg.chunk_rows),
    ]  # fmt: skip


def write_config(cfg: ExtractConfig, path: Path) -> Path:
    """`max_documents` has no flag of its own: it travels in a YAML config, as a user's would."""
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def assert_same_store(a_url: str, b_url: str) -> None:
    a, b = ActivationStore.open(a_url), ActivationStore.open(b_url)
    assert a.num_rows == b.num_rows == TOKENS
    ra, rb = a.read(0, TOKENS), b.read(0, TOKENS)
    for name in ("inputs", "targets"):
        x, y = getattr(ra, name).view(torch.uint16), getattr(rb, name).view(torch.uint16)
        rows = (x != y).flatten(1).any(1).nonzero().flatten().tolist()
        assert not rows, f"{name} differ in rows {rows[:5]}... ({len(rows)} rows)"
    rows = (ra.token_ids != rb.token_ids).nonzero().flatten().tolist()
    assert not rows, f"token ids differ in rows {rows[:5]}... ({len(rows)} rows)"


@pytest.fixture(scope="module")
def reference(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The uninterrupted, unsharded extraction every other run must reproduce."""
    url = str(tmp_path_factory.mktemp("reference") / "store")
    extract(url, config(tiny_dirs["llama"]), progress=False)
    return url


def test_shard_ranges_are_whole_chunks_that_cover_the_rows() -> None:
    ranges = [Shard(i, 4).rows(700, 64) for i in range(4)]  # 11 chunks, the last one partial
    assert ranges == [(0, 128), (128, 320), (320, 512), (512, 700)]
    assert [Shard(i, 3).rows(100, 64) for i in range(3)] == [(0, 0), (0, 64), (64, 100)]  # more shards than chunks
    assert Shard.parse(" 2/5 ") == Shard(2, 5)
    for bad in ["5/5", "1", "a/b", "-1/3"]:
        with pytest.raises(CLTError, match="shard"):
            Shard.parse(bad)


def test_a_progress_record_is_one_metadata_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader polling a running shard must never see half a record (Zarr's attrs.update writes once per key)."""
    import zarr.core.group

    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=8, rows_per_chunk=4, reserve_rows=8)
    shard = Shard(1, 2)
    record_progress(store, shard, ShardProgress(4, 8))  # makes the record's group
    record = tmp_path / "s" / "shards" / shard.name / "zarr.json"
    seen: list[dict] = []
    save = zarr.core.group.AsyncGroup._save_metadata

    async def save_and_read(self: zarr.core.group.AsyncGroup, *args: object, **kw: object) -> None:
        await save(self, *args, **kw)
        seen.append(json.loads(record.read_text())["attributes"])

    monkeypatch.setattr(zarr.core.group.AsyncGroup, "_save_metadata", save_and_read)
    record_progress(store, shard, ShardProgress(4, 8, rows_done=4, done=True))
    assert seen == [{"start": 4, "stop": 8, "rows_done": 4, "done": True}]
    assert read_progress(store, shard) == ShardProgress(4, 8, 4, True)


def test_a_damaged_progress_record_is_reported(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=2, d_model=8, rows_per_chunk=4, reserve_rows=8)
    shard = Shard(1, 2)
    record_progress(store, shard, ShardProgress(4, 8))
    record = store.group["shards"][shard.name]
    record.update_attributes({"done": "yes"})
    with pytest.raises(CLTError, match="shard record shards/1-of-2 says done='yes', not true or false"):
        read_progress(store, shard)
    record.update_attributes({"done": False, "rows_done": 2.5})
    with pytest.raises(CLTError, match=r"attribute 'rows_done' of 'shards/1-of-2' is 2\.5, not an integer"):
        read_progress(store, shard)


def test_sharded_extraction_equals_the_unsharded_one(
    tiny_dirs: dict[str, Path], tmp_path: Path, reference: str
) -> None:
    cfg = config(tiny_dirs["llama"])
    url = str(tmp_path / "sharded")
    summaries = []
    for i in (2, 0, 1):  # any order; the store reads as empty until the last shard finishes
        assert not store_exists(url) or ActivationStore.open(url).num_rows == 0
        summaries.append(extract(url, cfg, shard=Shard(i, 3), progress=False))
        if i == 2:
            report = verify_store(url, scan=False)
            assert report.ok and any("1 of 3 shards done" in w for w in report.warnings), report.warnings
    assert [s.shards_done for s in summaries] == [1, 2, 3]
    assert describe_progress(ActivationStore.open(url)) is None
    assert "1 of 3 shards finished" in str(summaries[0]) and f"holds {TOKENS:,} rows" in str(summaries[2])
    assert_same_store(reference, url)
    whole, sharded = ActivationStore.open(reference).read_norm_stats(), ActivationStore.open(url).read_norm_stats()
    assert sharded.count == whole.count == TOKENS
    for name in ("inputs_mean", "inputs_std", "targets_mean", "targets_std"):  # Chan merge: exact up to rounding
        np.testing.assert_allclose(getattr(sharded, name), getattr(whole, name), rtol=1e-12, atol=1e-15)
    # A finished shard run again does nothing; a mismatched shard count is refused.
    assert extract(url, cfg, shard=Shard(1, 3), progress=False).rows_this_run == 0
    with pytest.raises(CLTError, match="other settings"):
        extract(url, cfg, shard=Shard(0, 2), progress=False)
    with pytest.raises(CLTError, match="delete the other shards"):
        extract(url, cfg, shard=Shard(0, 3), overwrite=True, progress=False)


def test_concurrent_shard_processes_on_s3_equal_the_unsharded_store(
    tiny_dirs: dict[str, Path], tmp_path: Path, s3_url: str, reference: str
) -> None:
    cfg = config(tiny_dirs["llama"])
    yaml_path = write_config(cfg, tmp_path / "extract.yaml")
    procs = [
        subprocess.Popen(
            [*cli_args(cfg, s3_url), "--config", str(yaml_path), "--shard", f"{i}/3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    failed = [out[-1500:] for p, out in zip(procs, outputs, strict=True) if p.returncode != 0]
    assert not failed, "\n".join(failed)
    assert sum(f"holds {TOKENS:,} rows" in out for out in outputs) >= 1  # the last to finish committed the store
    assert_same_store(reference, s3_url)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the extraction ended before it could be killed: {proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no rows were committed in time"
        time.sleep(0.02)


@pytest.mark.parametrize("shard", [None, Shard(1, 2)], ids=["unsharded", "shard-1-of-2"])
def test_sigkill_at_any_moment_then_rerun_gives_the_same_store(
    tiny_dirs: dict[str, Path], tmp_path: Path, reference: str, shard: Shard | None
) -> None:
    cfg = config(tiny_dirs["llama"])
    url = str(tmp_path / "killed")
    args = [*cli_args(cfg, url), "--config", str(write_config(cfg, tmp_path / "extract.yaml"))]
    if shard is not None:
        args += ["--shard", f"{shard.index}/{shard.count}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())

    def committed() -> int:
        try:
            store = ActivationStore.open(url)
        except CLTError:  # not there yet, or being created
            return 0
        if shard is None:
            return store.num_rows
        progress = read_progress(store, shard)
        return 0 if progress is None else progress.rows_done

    try:
        _wait_for(lambda: committed() >= CHUNK, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = committed()
    assert 0 < killed_at < TOKENS and killed_at % CHUNK == 0

    shards = [shard] if shard is None else [Shard(i, shard.count) for i in range(shard.count)]
    for s in shards:  # the killed one resumes; its sibling (when sharded) runs from scratch
        summary = extract(url, cfg, shard=s, progress=False)
    if shard is None:
        assert summary.resumed_from == killed_at
    assert_same_store(reference, url), killed_at
    a, b = ActivationStore.open(reference).read_norm_stats(), ActivationStore.open(url).read_norm_stats()
    for name in ("inputs_mean", "inputs_std", "targets_mean", "targets_std"):
        if shard is None:  # the same chunk-by-chunk fold: the very same bits
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        else:
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-15)
