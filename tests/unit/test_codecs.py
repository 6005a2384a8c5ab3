"""The store's codec setting: every codec round-trips rows bit-exactly (writer, sampler, scramble, S3), the codec is
read back from the arrays' metadata (`clt info`, the scramble's default), unknown names are one-line errors, and the
default is blosc-lz4 while stores written before the setting (zstd level 1) read as `zstd`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from zarr.codecs import ZstdCodec

from clt_core.cli import main
from clt_core.config import Config
from clt_core.data.codecs import CODECS, Codec, check_codec, codec_name
from clt_core.data.layout import DType
from clt_core.data.sampler import ActivationSampler, SamplerConfig
from clt_core.data.scramble import ScrambleConfig, scramble_store
from clt_core.data.store import ActivationStore
from clt_core.data.synthetic import SyntheticConfig
from clt_core.errors import ConfigError, StoreError
from clt_core.extract.extractor import ExtractConfig, extract

L, D, RPC, ROWS = 2, 8, 32, 200  # 6 full chunks and a partial one


def write_store(url: str, codec: Codec, dtype: DType) -> tuple[ActivationStore, np.ndarray, np.ndarray]:
    """A store of ROWS random rows whose token ids are the row indices; returns it and its storage arrays."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(ROWS, L, D, generator=gen).to(getattr(torch, dtype))
    targets = (torch.randn(ROWS, L, D, generator=gen) * 1e3).to(getattr(torch, dtype))
    store = ActivationStore.create(url, num_layers=L, d_model=D, dtype=dtype, rows_per_chunk=RPC, compression=codec)
    with store.writer() as writer:
        writer.append(inputs[:77], targets[:77], torch.arange(77))  # not chunk-aligned
        writer.append(inputs[77:], targets[77:], torch.arange(77, ROWS))
    return store, *_bits(inputs, targets)


def _bits(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    view = torch.int16 if inputs.dtype == torch.bfloat16 else torch.int32
    return inputs.view(view).numpy(), targets.view(view).numpy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_round_trips_rows_bit_exactly(tmp_path: Path, codec: Codec, dtype: DType) -> None:
    _, x, y = write_store(str(tmp_path / "s"), codec, dtype)
    store = ActivationStore.open(str(tmp_path / "s"))
    assert store.codec == codec
    rows = store.read(0, ROWS)
    assert rows.inputs.dtype == getattr(torch, dtype)
    np.testing.assert_array_equal(_bits(rows.inputs, rows.targets)[0], x)
    np.testing.assert_array_equal(_bits(rows.inputs, rows.targets)[1], y)
    assert torch.equal(rows.token_ids, torch.arange(ROWS, dtype=torch.int32))


@pytest.mark.parametrize("codec", ["blosc-lz4", "blosc-zstd", "none"])
def test_the_sampler_reads_every_codec_bit_exactly(tmp_path: Path, codec: Codec) -> None:
    _, x, y = write_store(str(tmp_path / "s"), codec, "bfloat16")
    store = ActivationStore.open(str(tmp_path / "s"))
    sampler = ActivationSampler(store, SamplerConfig(batch_size=50, buffer_chunks=2, normalization_method="none"))
    try:
        batches = [next(sampler) for _ in range(ROWS // 50)]  # one epoch
    finally:
        sampler.close()
    ids = torch.cat([b.token_ids for b in batches]).long()
    assert sorted(ids.tolist()) == list(range(ROWS))
    inputs, targets = _bits(torch.cat([b.inputs for b in batches]), torch.cat([b.targets for b in batches]))
    np.testing.assert_array_equal(inputs, x[ids])
    np.testing.assert_array_equal(targets, y[ids])


@pytest.mark.parametrize("codec", CODECS)
def test_the_scramble_keeps_the_source_codec(tmp_path: Path, codec: Codec) -> None:
    src, x, y = write_store(str(tmp_path / "src"), codec, "bfloat16")
    scramble_store(src.url, str(tmp_path / "dst"), ScrambleConfig(), progress=False)
    dst = ActivationStore.open(str(tmp_path / "dst"))
    assert dst.codec == codec
    ox, oy, ids = dst.read_storage(0, ROWS)
    assert sorted(ids.tolist()) == list(range(ROWS))
    np.testing.assert_array_equal(ox.view(np.int16), x[ids])
    np.testing.assert_array_equal(oy.view(np.int16), y[ids])


def test_the_scramble_codec_can_be_overridden(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, x, _ = write_store(str(tmp_path / "src"), "zstd", "float32")
    assert main(["scramble", src.url, str(tmp_path / "dst"), "--codec", "blosc-lz4", "-q"]) == 0
    dst = ActivationStore.open(str(tmp_path / "dst"))
    assert dst.codec == "blosc-lz4"
    ox, _, ids = dst.read_storage(0, ROWS)
    np.testing.assert_array_equal(ox.view(np.int32), x[ids])


def test_a_source_codec_clt_never_writes_is_refused_by_the_scramble(tmp_path: Path) -> None:
    src, _, _ = write_store(str(tmp_path / "src"), "zstd", "float32")
    meta = Path(src.loc.path) / "inputs" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["codecs"][1]["configuration"]["level"] = 7  # still readable, but not one of ours
    meta.write_text(json.dumps(doc))
    reopened = ActivationStore.open(src.url)
    assert reopened.codec.startswith("other: ") and '"level": 7' in reopened.codec
    with pytest.raises(StoreError, match="not one clt writes; choose one with --codec"):
        scramble_store(src.url, str(tmp_path / "dst"), ScrambleConfig(), progress=False)
    scramble_store(src.url, str(tmp_path / "dst"), ScrambleConfig(codec="zstd"), progress=False)
    assert ActivationStore.open(str(tmp_path / "dst")).codec == "zstd"


def test_info_names_the_codec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "syn")
    flags = ["--rows", "100", "--num-layers", "2", "--d-model", "8", "--num-features", "16", "--codec", "blosc-zstd"]
    assert main(["make-synthetic", url, *flags, "-q"]) == 0
    capsys.readouterr()
    assert main(["info", url]) == 0
    assert json.loads(capsys.readouterr().out)["codec"] == "blosc-zstd"


def test_an_unknown_codec_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StoreError) as err:
        ActivationStore.create(str(tmp_path / "s"), num_layers=L, d_model=D, compression="lz5")  # type: ignore[arg-type]
    assert str(err.value) == "unknown codec 'lz5'; use one of zstd, none, blosc-lz4, blosc-zstd"
    assert not (tmp_path / "s").exists()
    with pytest.raises(StoreError, match="use one of zstd, none, blosc-lz4, blosc-zstd"):
        check_codec("blosc")
    for model in (ExtractConfig, SyntheticConfig, ScrambleConfig):
        with pytest.raises(ConfigError) as cerr:
            model.from_dict({"codec": "lz5"})
        assert "\n" not in str(cerr.value) and "codec" in str(cerr.value) and "blosc-lz4" in str(cerr.value)
    with pytest.raises(SystemExit) as exit_:
        main(["make-synthetic", str(tmp_path / "s"), "--codec", "lz5"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "'zstd', 'none', 'blosc-lz4', 'blosc-zstd'" in lines[0]


def test_the_default_is_blosc_lz4_and_older_stores_read_as_zstd(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=L, d_model=D)
    assert store.codec == "blosc-lz4"
    old = ActivationStore.create(str(tmp_path / "old"), num_layers=L, d_model=D, compression="zstd")
    for name in ("inputs", "targets", "token_ids"):
        doc = json.loads((tmp_path / "old" / name / "zarr.json").read_text())  # what stores held before the setting
        assert doc["codecs"] == [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
        ]
    assert old.codec == "zstd" and codec_name((ZstdCodec(level=1),), np.dtype(np.uint16)) == "zstd"
    assert ExtractConfig().codec == SyntheticConfig().codec == "blosc-lz4"
    assert ScrambleConfig().codec is None  # the source's


def test_the_pipeline_names_and_caches_the_store_by_its_codec() -> None:
    from prefect.cache_policies import INPUTS

    from flows.config import PipelineConfig, fingerprint

    a, b = PipelineConfig(), PipelineConfig.from_dict({"extract": {"codec": "blosc-lz4"}})
    assert b.extract.codec == "blosc-lz4"
    assert fingerprint(a.extract, 1) != fingerprint(b.extract, 1)  # the store's name, acts-<fingerprint>

    def key(config: Config) -> str | None:
        inputs = {"url": "s3://acts/x", "config": config, "index": 0, "count": 1}
        return INPUTS.compute_key(task_ctx=None, inputs=inputs, flow_parameters={})  # type: ignore[arg-type]

    assert key(a.extract) != key(b.extract)
    assert key(a.extract) == key(PipelineConfig().extract)


def test_extraction_writes_and_resumes_with_its_codec(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    url, model = str(tmp_path / "acts"), str(tiny_dirs["gpt2"])
    settings = {"model": model, "tokens": 100, "context_size": 32, "compute_dtype": "float32", "chunk_rows": 32}
    flags = ["--model", model, "--text", "packaged:kjv", "--tokens", "100", "--context-size", "32", "-q"]
    flags += ["--compute-dtype", "float32", "--chunk-rows", "32", "--codec", "blosc-lz4"]
    assert main(["extract", "--out", url, *flags]) == 0
    store = ActivationStore.open(url, mode="a")
    assert store.codec == "blosc-lz4" and store.num_rows == 100
    store.update_info(rows_committed=50)  # as if cut short
    resume = {**settings, "text": {"source": "packaged:kjv"}, "codec": "zstd"}
    with pytest.raises(StoreError, match="extracted with codec blosc-lz4, now zstd"):
        extract(url, ExtractConfig.from_dict(resume), progress=False)


@pytest.mark.s3
def test_blosc_lz4_round_trips_through_s3(s3_url: str) -> None:
    _, x, y = write_store(s3_url, "blosc-lz4", "bfloat16")
    store = ActivationStore.open(s3_url)
    assert store.codec == "blosc-lz4"
    inputs, targets, ids = store.read_storage(0, ROWS)
    np.testing.assert_array_equal(inputs.view(np.int16), x)
    np.testing.assert_array_equal(targets.view(np.int16), y)
    assert np.array_equal(ids, np.arange(ROWS))
