"""Import/export between the activation store and the seed library's HDF5 directory layout."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from clt_core.cli import main
from clt_core.data.hdf5 import MANIFEST_DTYPE, export_hdf5, import_hdf5
from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.store import ActivationStore
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.errors import StoreError

L, D = 3, 8
FILE_ROWS = (100, 130, 70)
NP_DTYPES = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}


@dataclass
class SeedDir:
    """A seed-format directory and what it holds, rows in manifest order."""

    path: Path
    inputs: np.ndarray  # [N, L, d] storage dtype
    targets: np.ndarray
    token_ids: np.ndarray  # [N] int32, -1 where a file has none
    metadata: dict[str, Any]
    norm_stats: dict[str, Any] | None


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    if dtype == "bfloat16":
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.uint16).numpy()
    return x.astype(NP_DTYPES[dtype])


def write_seed_dir(
    root: Path,
    *,
    dtype: str = "bfloat16",
    compression: str | None = "gzip",
    index_kind: str = "per_chunk",
    file_rows: tuple[int, ...] = FILE_ROWS,
    token_ids: tuple[bool, ...] | bool = True,
    norm_stats: bool = True,
    shuffle_manifest: bool = False,
    layouts: list[dict[str, Any]] | None = None,
    suffixes: tuple[str, ...] | None = None,
    seed: int = 0,
) -> SeedDir:
    """Write a directory the way the seed generator does: per-layer datasets chunked (min(rows, 64), d), a manifest,
    metadata.json and norm_stats.json (float32 mean and std as Python floats). `layouts[i]` overrides file i's
    create_dataset arguments; token_ids go into the files flagged in `token_ids` (int64, to check dtypes survive)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    with_ids = (token_ids,) * len(file_rows) if isinstance(token_ids, bool) else token_ids
    per_file = []
    for i, rows in enumerate(file_rows):
        inputs, targets = _random(rng, (rows, L, D), dtype), _random(rng, (rows, L, D), dtype)
        ids = rng.integers(0, 50_000, rows) if with_ids[i] else np.full(rows, -1)
        suffix = suffixes[i] if suffixes else ".hdf5"
        kwargs = {"compression": compression, "chunks": (min(rows, 64), D)}
        if layouts:
            kwargs = layouts[i]
        with h5py.File(root / f"chunk_{i}{suffix}", "w", libver="latest") as h5:
            for layer in range(L):
                h5.create_dataset(f"layer_{layer}/inputs", data=inputs[:, layer], **kwargs)
                h5.create_dataset(f"layer_{layer}/targets", data=targets[:, layer], **kwargs)
            if with_ids[i]:
                h5.create_dataset("token_ids", data=ids.astype(np.int64))
        per_file.append((inputs, targets, ids.astype(np.int32)))

    pairs = np.concatenate([np.stack([np.full(n, i), np.arange(n)], axis=1) for i, n in enumerate(file_rows)])
    if shuffle_manifest:
        pairs = pairs[rng.permutation(len(pairs))]
    if index_kind == "per_chunk":
        offsets = np.concatenate([[0], np.cumsum(file_rows)[:-1]])
        np.array(list(zip(range(len(file_rows)), file_rows, offsets, strict=True)), MANIFEST_DTYPE).tofile(
            root / "index.bin"
        )
    else:
        pairs.astype(np.uint32).tofile(root / "index.bin")

    def gather(k: int) -> np.ndarray:
        return np.stack([per_file[c][k][r] for c, r in pairs])

    metadata = {
        "model_name": "HuggingFaceTB/SmolLM2-135M",
        "dataset": "monology/pile-uncopyrighted",
        "split": "train",
        "num_layers": L,
        "d_model": D,
        "dtype": dtype,
        "total_tokens": int(sum(file_rows)),
        "chunk_tokens": 128,
        "created": "2025-05-01 12:00:00",
        "note": {"kept": True},
    }
    (root / "metadata.json").write_text(json.dumps(metadata, indent=2))
    stats = None
    if norm_stats:
        stats = {
            str(layer): {
                kind: {
                    "mean": rng.standard_normal(D).astype(np.float32).tolist(),
                    "std": rng.random(D).astype(np.float32).tolist(),
                }
                for kind in ("inputs", "targets")
            }
            for layer in range(L)
        }
        (root / "norm_stats.json").write_text(json.dumps(stats))
    return SeedDir(root, gather(0), gather(1), gather(2), metadata, stats)


def _datasets(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with h5py.File(path, "r") as h5:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = {
                    "dtype": obj.dtype.str,
                    "shape": obj.shape,
                    "bytes": obj[...].tobytes(),
                    "layout": (obj.chunks, obj.compression, obj.compression_opts, obj.shuffle, obj.fletcher32),
                }

        h5.visititems(visit)
    return out


def assert_same_seed_dir(a: Path, b: Path) -> None:
    """Bit-exact equality as a seed user sees it: same files, dataset bytes/dtypes/layouts, index bytes, JSON."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert (a / "index.bin").read_bytes() == (b / "index.bin").read_bytes()
    for name in ("metadata.json", "norm_stats.json"):
        if (a / name).exists():
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    for chunk in sorted(a.glob("chunk_*")):
        assert _datasets(chunk) == _datasets(b / chunk.name), chunk.name


def _storage(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def assert_store_holds(store: ActivationStore, seed: SeedDir) -> None:
    rows = store.read(0, store.num_rows)
    assert store.num_rows == len(seed.inputs)
    assert _storage(rows.inputs).dtype == seed.inputs.dtype
    assert np.array_equal(_storage(rows.inputs), seed.inputs)
    assert np.array_equal(_storage(rows.targets), seed.targets)
    assert np.array_equal(rows.token_ids.numpy(), seed.token_ids)


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("index_kind", ["per_chunk", "per_row"])
@pytest.mark.parametrize("compression", ["gzip", None])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: str, compression: str | None, index_kind: str) -> None:
    seed = write_seed_dir(tmp_path / "seed", dtype=dtype, compression=compression, index_kind=index_kind)
    store = import_hdf5(str(seed.path), str(tmp_path / "store"), rows_per_chunk=64, progress=False)
    assert store.dtype == dtype
    assert store.info.hdf5_source["index_kind"] == index_kind
    assert_store_holds(ActivationStore.open(store.url), seed)
    out = export_hdf5(store.url, str(tmp_path / "out"), progress=False)
    assert_same_seed_dir(seed.path, out)


def test_import_maps_metadata_and_norm_stats(tmp_path: Path) -> None:
    seed = write_seed_dir(tmp_path / "seed")
    store = ActivationStore.open(import_hdf5(str(seed.path), str(tmp_path / "store"), progress=False).url)
    info = store.info
    assert (info.num_layers, info.d_model, info.dtype) == (L, D, "bfloat16")
    assert info.model == {"name": "HuggingFaceTB/SmolLM2-135M"}
    assert info.text_dataset == "monology/pile-uncopyrighted"
    assert info.parent == str(seed.path)
    assert info.hdf5_source["metadata"] == seed.metadata
    assert [f["rows"] for f in info.hdf5_source["files"]] == list(FILE_ROWS)
    stats = store.read_norm_stats()
    assert stats is not None and stats.count == sum(FILE_ROWS)
    assert seed.norm_stats is not None
    for layer in range(L):
        assert stats.inputs_mean[layer].tolist() == seed.norm_stats[str(layer)]["inputs"]["mean"]
        assert stats.targets_std[layer].tolist() == seed.norm_stats[str(layer)]["targets"]["std"]


def test_shuffled_per_row_manifest_imports_in_manifest_order(tmp_path: Path) -> None:
    seed = write_seed_dir(tmp_path / "seed", index_kind="per_row", shuffle_manifest=True, norm_stats=False)
    store = import_hdf5(str(seed.path), str(tmp_path / "store"), rows_per_chunk=32, progress=False)
    assert_store_holds(store, seed)
    assert_same_seed_dir(seed.path, export_hdf5(store.url, str(tmp_path / "out"), progress=False))


def test_mixed_layouts_and_partial_token_ids_round_trip(tmp_path: Path) -> None:
    layouts = [
        {"compression": "gzip", "compression_opts": 1, "shuffle": True, "chunks": (16, D)},
        {},  # contiguous, uncompressed
        {"compression": "lzf", "chunks": (70, D), "fletcher32": True},
    ]
    seed = write_seed_dir(
        tmp_path / "seed",
        dtype="float16",
        layouts=layouts,
        token_ids=(True, False, True),
        suffixes=(".hdf5", ".h5", ".hdf5"),
    )
    with h5py.File(seed.path / "chunk_1.h5", "a") as h5:  # one dataset stored unlike its file's others
        data = h5["layer_2/targets"][...]
        del h5["layer_2/targets"]
        h5.create_dataset("layer_2/targets", data=data, compression="gzip", compression_opts=9, chunks=(10, D))
    store = import_hdf5(str(seed.path), str(tmp_path / "store"), rows_per_chunk=50, progress=False)
    assert_store_holds(store, seed)
    assert (store.read(100, 230).token_ids == -1).all()
    out = export_hdf5(store.url, str(tmp_path / "out"), progress=False)
    assert_same_seed_dir(seed.path, out)
    with h5py.File(out / "chunk_1.h5") as h5:
        assert "token_ids" not in h5
    with h5py.File(out / "chunk_0.hdf5") as h5:
        assert h5["token_ids"].dtype == np.int64


# ------------------------------------------------------------------------------------------- native stores
def test_export_of_a_native_store_reimports_to_the_same_rows(tmp_path: Path) -> None:
    config = SyntheticConfig(rows=300, num_layers=L, d_model=D, num_features=16, active_per_token=2, rows_per_chunk=128)
    store = make_synthetic_store(str(tmp_path / "native"), config)
    stats = compute_norm_stats(store, progress=False)
    out = export_hdf5(store.url, str(tmp_path / "out"), progress=False)

    assert sorted(p.name for p in out.glob("chunk_*")) == ["chunk_0.hdf5", "chunk_1.hdf5", "chunk_2.hdf5"]
    records = np.fromfile(out / "index.bin", MANIFEST_DTYPE)
    assert records.tolist() == [(0, 128, 0), (1, 128, 128), (2, 44, 256)]
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["num_layers"], meta["d_model"], meta["dtype"], meta["total_tokens"]) == (L, D, "bfloat16", 300)
    assert meta["model_name"] == "synthetic" and meta["chunk_tokens"] == 128
    with h5py.File(out / "chunk_2.hdf5") as h5:
        assert h5["layer_1/inputs"].shape == (44, D) and h5["layer_1/inputs"].dtype == np.uint16
        assert h5["token_ids"][...].tolist() == list(range(256, 300))

    again = import_hdf5(str(out), str(tmp_path / "again"), progress=False)
    a, b = store.read(0, 300), again.read(0, 300)
    assert torch.equal(a.inputs.view(torch.uint16), b.inputs.view(torch.uint16))
    assert torch.equal(a.targets.view(torch.uint16), b.targets.view(torch.uint16))
    assert torch.equal(a.token_ids, b.token_ids)
    reimported = again.read_norm_stats()
    assert reimported is not None and np.array_equal(reimported.inputs_std, stats.inputs_std)
    assert np.array_equal(reimported.targets_mean, stats.targets_mean)


def test_native_export_without_token_ids_or_norm_stats(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=L, d_model=D, dtype="float32", rows_per_chunk=40)
    x = torch.randn(90, L, D)
    with store.writer() as w:
        w.append(x, 2 * x)
    out = export_hdf5(store.url, str(tmp_path / "out"), progress=False)
    assert not (out / "norm_stats.json").exists()
    with h5py.File(out / "chunk_1.hdf5") as h5:
        assert "token_ids" not in h5
        assert np.array_equal(h5["layer_2/targets"][...], 2 * x[40:80, 2].numpy())


def test_store_derived_from_an_import_exports_its_own_chunks(tmp_path: Path) -> None:
    seed = write_seed_dir(tmp_path / "seed", norm_stats=False)
    store = import_hdf5(str(seed.path), str(tmp_path / "store"), rows_per_chunk=128, progress=False)
    store.update_info(parent="s3://acts/elsewhere")  # as a scramble of the imported store would record
    out = export_hdf5(store.url, str(tmp_path / "out"), progress=False)
    assert np.fromfile(out / "index.bin", MANIFEST_DTYPE)["num_tokens"].tolist() == [128, 128, 44]


# ----------------------------------------------------------------------------------------- destinations
def test_export_refuses_a_non_empty_destination_unless_overwrite(tmp_path: Path) -> None:
    seed = write_seed_dir(tmp_path / "seed", norm_stats=False)
    store = import_hdf5(str(seed.path), str(tmp_path / "store"), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "chunk_9.hdf5").write_bytes(b"stale")
    (out / "README").write_text("mine")
    with pytest.raises(StoreError, match="--overwrite"):
        export_hdf5(store.url, str(out), progress=False)
    export_hdf5(store.url, str(out), overwrite=True, progress=False)
    assert not (out / "chunk_9.hdf5").exists()
    assert (out / "README").read_text() == "mine"
    (out / "README").unlink()
    assert_same_seed_dir(seed.path, out)


def test_import_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    seed = write_seed_dir(tmp_path / "seed", norm_stats=False)
    dst = tmp_path / "home"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep")
    with pytest.raises(StoreError, match="not an activation store"):
        import_hdf5(str(seed.path), str(dst), overwrite=True, progress=False)
    assert (dst / "precious.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------------ bad input
def _truncate(seed: Path) -> None:
    data = (seed / "chunk_1.hdf5").read_bytes()
    (seed / "chunk_1.hdf5").write_bytes(data[: len(data) // 2])


def _drop_dataset(seed: Path) -> None:
    with h5py.File(seed / "chunk_2.hdf5", "a") as h5:
        del h5["layer_1/targets"]


def _reshape_dataset(seed: Path) -> None:
    with h5py.File(seed / "chunk_0.hdf5", "a") as h5:
        del h5["layer_2/inputs"]
        h5.create_dataset("layer_2/inputs", data=np.zeros((100, D + 1), np.uint16))


def _edit_metadata(**changes: Any) -> Any:
    def edit(seed: Path) -> None:
        meta = json.loads((seed / "metadata.json").read_text())
        (seed / "metadata.json").write_text(json.dumps({**meta, **changes}))

    return edit


def _bad_record(seed: Path) -> None:
    np.array([(0, 100, 0), (1, 120, 100), (2, 80, 220)], MANIFEST_DTYPE).tofile(seed / "index.bin")


BAD_INPUTS = {
    "no index": (lambda s: (s / "index.bin").unlink(), r"index\.bin: missing"),
    "no metadata": (lambda s: (s / "metadata.json").unlink(), r"metadata\.json: missing"),
    "missing chunk file": (lambda s: (s / "chunk_1.hdf5").unlink(), r"chunk_1\.hdf5.*missing"),
    "truncated chunk file": (_truncate, r"chunk_1\.hdf5: not a readable HDF5 file"),
    "missing dataset": (_drop_dataset, r"chunk_2\.hdf5: dataset layer_1/targets is missing"),
    "wrong shape": (_reshape_dataset, r"chunk_0\.hdf5: layer_2/inputs has shape \(100, 9\)"),
    "num_layers": (_edit_metadata(num_layers=4), r"metadata\.json: num_layers=4 but the chunk files hold 3"),
    "d_model": (_edit_metadata(d_model=16), r"metadata\.json: d_model=16 but the chunk files hold 8"),
    "dtype": (_edit_metadata(dtype="float16"), r"metadata\.json: dtype 'float16' but the chunk files store uint16"),
    "index size": (lambda s: (s / "index.bin").write_bytes(b"\0" * 12), r"index\.bin: 12 bytes fits neither"),
    "record rows": (_bad_record, r"index\.bin: per-chunk records, but chunk_1\.hdf5 holds 130 rows"),
    "bad json": (lambda s: (s / "metadata.json").write_text("{"), r"metadata\.json: not readable JSON"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_store_error_naming_the_file(tmp_path: Path, case: str) -> None:
    seed = write_seed_dir(tmp_path / "seed", norm_stats=False)
    damage, message = BAD_INPUTS[case]
    damage(seed.path)
    with pytest.raises(StoreError, match=message) as err:
        import_hdf5(str(seed.path), str(tmp_path / "store"), progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "store").exists()  # checked before anything was written


def test_per_row_manifest_that_misses_rows_is_refused(tmp_path: Path) -> None:
    seed = write_seed_dir(tmp_path / "seed", index_kind="per_row", norm_stats=False)
    pairs = np.fromfile(seed.path / "index.bin", np.uint32).reshape(-1, 2)
    pairs[5] = pairs[4]  # row 4 twice, row 5 never
    pairs.tofile(seed.path / "index.bin")
    with pytest.raises(StoreError, match="exactly once"):
        import_hdf5(str(seed.path), str(tmp_path / "store"), progress=False)


# -------------------------------------------------------------------------------------------- CLI and S3
def test_cli_import_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed = write_seed_dir(tmp_path / "seed")
    dst, out = str(tmp_path / "store"), str(tmp_path / "out")
    assert main(["import-hdf5", str(seed.path), dst, "-q", "--rows-per-chunk", "64"]) == 0
    assert "imported 300 rows" in capsys.readouterr().out
    assert main(["import-hdf5", str(seed.path), dst, "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-hdf5", str(seed.path), dst, "-q", "--overwrite"]) == 0
    assert main(["export-hdf5", dst, out, "-q"]) == 0
    assert main(["export-hdf5", dst, out, "-q"]) == 2
    assert_same_seed_dir(seed.path, Path(out))


@pytest.mark.s3
def test_import_to_s3_and_export_back(tmp_path: Path, s3_url: str) -> None:
    seed = write_seed_dir(tmp_path / "seed", dtype="float16", index_kind="per_row")
    store = import_hdf5(str(seed.path), s3_url, rows_per_chunk=64, progress=False)
    assert_store_holds(ActivationStore.open(s3_url), seed)
    out = export_hdf5(store.url, str(tmp_path / "out"), progress=False)
    assert_same_seed_dir(seed.path, out)
