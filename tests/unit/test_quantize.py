"""Quantised stores (storage dtypes int8 and fp8, data/quantize.py): the error the coding adds on heavy-tailed rows,
the compiled kernels against the PyTorch path bit for bit, and every reader seeing the dequantised values (store
reads, sampler, norm stats, scramble, verify, export-hdf5), extraction (resume, shards) and S3, and bad input."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from tiny_models import extract_config

from clt_core.cli import main
from clt_core.data import quantize as Q
from clt_core.data import sampler as sampler_module
from clt_core.data.hdf5 import export_hdf5
from clt_core.data.layout import FORMAT_VERSION, INFO_KEY, REFERENCE_ARRAY, to_storage
from clt_core.data.norm_stats import RunningMoments, compute_norm_stats
from clt_core.data.sampler import ActivationSampler, Normalizer, SamplerConfig, _prepare
from clt_core.data.scramble import ScrambleConfig, scramble_store
from clt_core.data.shards import Shard
from clt_core.data.store import ActivationStore
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.data.verify import verify_store
from clt_core.errors import CLTError, ConfigError, StoreError
from clt_core.extract.extractor import ExtractConfig, extract
from clt_core.model import kernels

L, D, RPC, ROWS = 3, 72, 32, 200  # d not a multiple of 16: the kernels' scalar tails run too
KINDS = ("int8", "fp8")
OUTLIERS = [3, 17, 40]
compiled = pytest.mark.skipif(not kernels.compiled_for(torch.empty(0)), reason="no C compiler")


def heavy_tailed(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows like real MLP activations: Student-t values, per-dimension offsets and spreads, and a few outlier
    dimensions 100x larger than the rest (bfloat16)."""
    gen = torch.Generator().manual_seed(seed)

    def one() -> torch.Tensor:
        t = torch.distributions.StudentT(5.0).sample((rows, L, D))  # uses the global generator: seeded below
        spread = torch.rand(L, D, generator=gen) + 0.2
        spread[:, OUTLIERS] *= 100.0
        return (t * spread + torch.randn(L, D, generator=gen)).to(torch.bfloat16)

    torch.manual_seed(seed)
    return one(), one()


def quantised_store(
    url: str, kind: str, rows: int = ROWS, **kw: object
) -> tuple[ActivationStore, torch.Tensor, torch.Tensor]:
    """A `kind` store of heavy-tailed rows (token ids = row index), written in two uneven appends."""
    x, y = heavy_tailed(rows)
    ref = Q.reference_from_rows(x[: Q.REFERENCE_ROWS], y[: Q.REFERENCE_ROWS])
    store = ActivationStore.create(
        url,
        num_layers=L,
        d_model=D,
        quantization=kind,
        reference=ref,
        rows_per_chunk=RPC,
        **kw,  # type: ignore[arg-type]
    )
    cut = min(77, rows // 2)  # not chunk-aligned
    with store.writer() as writer:
        writer.append(x[:cut], y[:cut], torch.arange(cut))
        writer.append(x[cut:], y[cut:], torch.arange(cut, rows))
    return ActivationStore.open(url), x, y


def bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 bits with every NaN the same (kernels and PyTorch may pick different NaN bits)."""
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t).view(torch.int16)


# ----------------------------------------------------------------------------------------------------- coding
@pytest.mark.parametrize("kind", KINDS)
def test_the_quantisation_error_on_heavy_tailed_rows_is_small(kind: str) -> None:
    x, y = heavy_tailed(2048)
    ref = Q.reference_from_rows(x[:1024], y[:1024])
    for rows, name in ((x, "inputs"), (y, "targets")):
        codes, scale = Q.quantize(rows, *ref.tensors(name), kind)
        assert codes.dtype == (np.int8 if kind == "int8" else np.uint8) and scale.shape == (2048, L)
        back = Q.dequantize(codes, scale, *ref.tensors(name), kind)
        error = Q.nmse(back, rows)
        assert error <= (2e-4 if kind == "int8" else 1e-3), (name, error)
        # without the reference's standardisation the outlier dimensions cost the others their precision
        zero, one = torch.zeros(L, D), torch.ones(L, D)
        plain = Q.dequantize(*Q.quantize(rows, zero, one, kind), zero, one, kind)
        rest = [i for i in range(D) if i not in OUTLIERS]
        assert Q.nmse(plain[..., rest], rows[..., rest]) > 2 * Q.nmse(back[..., rest], rows[..., rest])


def test_nan_and_inf_rows_read_back_as_nan_and_constant_rows_exactly() -> None:
    x, y = heavy_tailed(8)
    x[2, 1, 5], x[4, 0, 0] = float("nan"), float("inf")
    ref = Q.reference_from_rows(x, y)
    assert ref.rows == 6  # the rows holding NaN/Inf are left out of it
    c, s = ref.tensors("inputs")
    for kind in KINDS:
        codes, scale = Q.quantize(x, c, s, kind)
        assert np.isnan(scale[2, 1]) and np.isnan(scale[4, 0]) and (codes[2, 1] == 0).all()
        back = Q.dequantize(codes, scale, c, s, kind)
        assert torch.isnan(back[2, 1]).all() and torch.isnan(back[4, 0]).all() and torch.isfinite(back[2, 0]).all()
        at_centre = x[6:7].float()[0]  # every value at the centre: scale 0, codes 0, read back exactly
        codes, scale = Q.quantize(x[6:7], at_centre, s, kind)
        assert (scale == 0).all() and (codes == 0).all()
        assert torch.equal(Q.dequantize(codes, scale, at_centre, s, kind), x[6:7])


@compiled
@pytest.mark.parametrize("kind", KINDS)
def test_the_kernels_code_and_decode_exactly_as_pytorch(kind: str) -> None:
    x, _ = heavy_tailed(300, seed=1)
    x[5, 2, 7], x[9] = float("nan"), 0.0
    ref = Q.reference_from_rows(x, x)
    c, s = ref.tensors("inputs")
    codes, scale = Q.quantize(x, c, s, kind, compiled=True)
    codes_pt, scale_pt = Q.quantize(x, c, s, kind, compiled=False)
    np.testing.assert_array_equal(codes, codes_pt)
    np.testing.assert_array_equal(scale, scale_pt)  # NaN where NaN
    back = Q.dequantize(codes, scale, c, s, kind, compiled=True)
    assert torch.equal(bits(back), bits(Q.dequantize(codes, scale, c, s, kind, compiled=False)))

    # into shuffled places, normalised, flagging the NaN row: as dequantising and then normalising
    norm = Normalizer(c * 0.5, s * 2.0 + 0.1, c, s)
    positions = torch.randperm(300)
    out = torch.empty(300, L, D, dtype=torch.bfloat16)
    bad = torch.zeros(300, dtype=torch.bool)
    q, qs = torch.from_numpy(codes), torch.from_numpy(scale)
    affine = {"norm_scale": norm.inputs_scale, "norm_bias": norm.inputs_bias}
    kernels.dequantize_rows(q, kind, qs, c, s, out, **affine, positions=positions, bad=bad)
    expected = norm.inputs(Q.dequantize_torch(torch.from_numpy(codes), torch.from_numpy(scale), c, s, kind))
    assert torch.equal(bits(out[positions]), bits(expected.to(torch.bfloat16)))
    assert bad.nonzero().flatten().tolist() == [5]


@compiled
def test_fp8_codes_equal_pytorch_for_every_bfloat16_value() -> None:
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = every[torch.isfinite(every) & (every.float().abs() <= 448)]
    row = torch.cat([values, torch.tensor([448.0], dtype=torch.bfloat16)])  # absmax 448: scale exactly 1
    rows = row.reshape(1, 1, -1)
    zero, one = torch.zeros(1, row.numel()), torch.ones(1, row.numel())
    for use_kernel in (True, False):
        codes, scale = Q.quantize(rows, zero, one, "fp8", compiled=use_kernel)
        assert scale[0, 0] == 1.0
        expected = row.float().to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        np.testing.assert_array_equal(codes[0, 0], expected)
    every_code = np.arange(256, dtype=np.uint8).reshape(1, 1, 256)
    decoded = [Q.dequantize(every_code, np.ones((1, 1), np.float32), torch.zeros(1, 256), torch.ones(1, 256), "fp8",
                            compiled=k) for k in (True, False)]  # fmt: skip
    assert torch.equal(bits(decoded[0]), bits(decoded[1]))
    exact = torch.from_numpy(every_code[0, 0]).view(torch.float8_e4m3fn).float()  # (-0 reads back as +0: x·s + 0)
    torch.testing.assert_close(decoded[1][0, 0].float(), exact, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------------ store
@pytest.mark.parametrize("kind", KINDS)
def test_a_quantised_store_reads_back_dequantised(tmp_path: Path, kind: str) -> None:
    store, x, y = quantised_store(str(tmp_path / "s"), kind)
    assert (store.storage_dtype, store.dtype, store.quantization) == (kind, "bfloat16", kind)
    assert store.info.format_version == FORMAT_VERSION == 2 and store.torch_dtype == torch.bfloat16
    assert store.row_bytes == 2 * L * D + 4 + 2 * L * 4
    rows = store.read(0, ROWS)
    raw = store.read_raw(0, ROWS)
    assert raw.inputs.dtype == (np.int8 if kind == "int8" else np.uint8) and raw.inputs_scale.shape == (ROWS, L)
    assert np.array_equal(store.read_storage(0, ROWS)[0], raw.inputs)  # read_storage: the codes as stored
    ref = store.reference
    assert torch.equal(rows.inputs, Q.dequantize(raw.inputs, raw.inputs_scale, *ref.tensors("inputs"), kind))
    assert torch.equal(rows.targets, Q.dequantize(raw.targets, raw.targets_scale, *ref.tensors("targets"), kind))
    assert Q.nmse(rows.inputs, x) < 1e-3 and Q.nmse(rows.targets, y) < 1e-3
    assert torch.equal(rows.token_ids, torch.arange(ROWS, dtype=torch.int32))
    codes, _ = Q.quantize(x, *ref.tensors("inputs"), kind)
    assert np.array_equal(raw.inputs, codes)  # the partial tail was rewritten with its codes, not re-quantised
    assert "dtype=" + kind in repr(store)


def test_info_and_the_cli_name_the_storage_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "syn")
    flags = ["--rows", "300", "--num-layers", "2", "--d-model", "16", "--num-features", "16", "--rows-per-chunk", "64"]
    assert main(["make-synthetic", url, *flags, "--storage-dtype", "fp8", "--codec", "zstd", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", url]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["storage_dtype"], info["codec"], info["quantization"], info["dtype"]) == (
        "fp8",
        "zstd",
        "fp8",
        "bfloat16",
    )
    assert info["bytes_per_row"] == 2 * 2 * 16 + 4 + 2 * 2 * 4 and info["format_version"] == 2
    plain = make_synthetic_store(str(tmp_path / "plain"), SyntheticConfig(rows=10, num_layers=2, d_model=16))
    assert plain.storage_dtype == "bfloat16" and plain.info.format_version == 1 and plain.info.quantization == "none"


def test_chunks_are_sized_by_the_stored_item() -> None:
    from clt_core.data.layout import default_rows_per_chunk

    assert default_rows_per_chunk(30, 576, "bfloat16") == 128
    assert default_rows_per_chunk(30, 576, "int8") == default_rows_per_chunk(30, 576, "fp8") == 256


# ---------------------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_sampler_batches_equal_dequantised_then_normalised_rows(
    tmp_path: Path, kind: str, use_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if use_kernel and not kernels.compiled_for(torch.empty(0)):
        pytest.skip("no C compiler")
    if not use_kernel:
        monkeypatch.setattr(sampler_module.kernels, "compiled_for", lambda _: False)
    store, _, _ = quantised_store(str(tmp_path / "s"), kind)
    compute_norm_stats(ActivationStore.open(store.url, "a"), progress=False)
    store = ActivationStore.open(store.url)
    sampler = ActivationSampler(store, SamplerConfig(batch_size=50, buffer_chunks=2))
    try:
        batches = [next(sampler) for _ in range(ROWS // 50)]  # one epoch
    finally:
        sampler.close()
    ids = torch.cat([b.token_ids for b in batches]).long()
    assert sorted(ids.tolist()) == list(range(ROWS))
    expected = _prepare(store.read(0, ROWS), sampler.normalizer, torch.bfloat16)
    assert torch.equal(bits(torch.cat([b.inputs for b in batches])), bits(expected.inputs[ids]))
    assert torch.equal(bits(torch.cat([b.targets for b in batches])), bits(expected.targets[ids]))


@pytest.mark.parametrize("nonfinite", ["skip", "error"])
def test_the_sampler_finds_nan_rows_of_a_quantised_store(tmp_path: Path, nonfinite: str) -> None:
    x, y = heavy_tailed(96)
    x[40, 1, 3] = float("nan")
    ref = Q.reference_from_rows(x, y)
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=L, d_model=D, quantization="int8", reference=ref,
                                   rows_per_chunk=RPC)  # fmt: skip
    with store.writer() as writer:
        writer.append(x, y, torch.arange(96))
    sampler = ActivationSampler(store, SamplerConfig(batch_size=19, buffer_chunks=3, normalization_method="none",
                                                     nonfinite=nonfinite))  # type: ignore[arg-type]  # fmt: skip
    try:
        if nonfinite == "error":
            with pytest.raises(StoreError, match=r"row\(s\) 40 hold NaN/Inf"):
                next(sampler)
        else:
            ids = torch.cat([next(sampler).token_ids for _ in range(5)])
            assert 40 not in ids.tolist() and len(set(ids.tolist())) == 95
    finally:
        sampler.close()
    report = verify_store(store.url, progress=False)
    assert not report.ok and report.nonfinite_rows == 1 and report.nonfinite_examples == [40]


@pytest.mark.parametrize("kind", KINDS)
def test_norm_stats_verify_and_export_read_the_dequantised_values(tmp_path: Path, kind: str) -> None:
    store, _, _ = quantised_store(str(tmp_path / "s"), kind)
    stats = compute_norm_stats(ActivationStore.open(store.url, "a"), workers=2, progress=False)
    rows = store.read(0, ROWS)
    moments = RunningMoments.of(rows.targets)
    np.testing.assert_allclose(stats.targets_mean, moments.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.targets_std, moments.std, rtol=1e-10)
    report = verify_store(store.url, progress=False)
    assert report.ok and f"{kind} (read as bfloat16)" in report.geometry, report.summary()

    out = export_hdf5(store.url, str(tmp_path / "h5"), progress=False)
    with h5py.File(out / "chunk_1.hdf5") as h5:
        exported = torch.from_numpy(np.asarray(h5["layer_2/inputs"])).view(torch.bfloat16)
    assert torch.equal(exported, rows.inputs[RPC : 2 * RPC, 2])
    assert json.loads((out / "metadata.json").read_text())["dtype"] == "bfloat16"


def test_verify_reports_a_missing_scale_chunk_and_a_missing_reference(tmp_path: Path) -> None:
    store, _, _ = quantised_store(str(tmp_path / "s"), "int8")
    (tmp_path / "s" / "targets_scale" / "c" / "2" / "0").unlink()
    report = verify_store(store.url, progress=False)
    assert not report.ok and any("'targets_scale': 1 committed chunk object(s) missing" in p for p in report.problems)
    assert report.bad_chunks == [2]
    (tmp_path / "s" / REFERENCE_ARRAY / "c" / "0" / "0" / "0").unlink()  # as if its writer died half way
    reopened = ActivationStore.open(store.url)
    assert reopened.load_reference() is None
    with pytest.raises(StoreError, match="without its complete quantisation reference") as err:
        reopened.read(0, 10)
    assert "\n" not in str(err.value)
    assert any("no complete quantisation reference" in p for p in verify_store(store.url, progress=False).problems)


# --------------------------------------------------------------------------------------------------- scramble
@pytest.mark.parametrize("kind", KINDS)
def test_scrambling_a_quantised_store_copies_codes_and_scales_bit_exactly(tmp_path: Path, kind: str) -> None:
    src, _, _ = quantised_store(str(tmp_path / "src"), kind)
    compute_norm_stats(ActivationStore.open(src.url, "a"), progress=False)
    scramble_store(src.url, str(tmp_path / "dst"), ScrambleConfig(seed=3), progress=False)
    dst = ActivationStore.open(str(tmp_path / "dst"))
    assert dst.storage_dtype == kind and dst.reference.digest() == src.reference.digest()
    a, b = src.read_raw(0, ROWS), dst.read_raw(0, ROWS)
    ids = b.token_ids
    assert sorted(ids.tolist()) == list(range(ROWS))
    for name in ("inputs", "targets", "inputs_scale", "targets_scale"):
        assert np.array_equal(getattr(b, name), getattr(a, name)[ids], equal_nan=True), name
    assert np.array_equal(dst.read_norm_stats().inputs_mean, src.read_norm_stats().inputs_mean)


def test_the_scramble_converts_between_storage_dtypes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = heavy_tailed(ROWS)
    bf16 = ActivationStore.create(str(tmp_path / "bf16"), num_layers=L, d_model=D, rows_per_chunk=RPC)
    with bf16.writer() as writer:
        writer.append(x, y, torch.arange(ROWS))
    compute_norm_stats(ActivationStore.open(bf16.url, "a"), progress=False)
    assert main(["scramble", bf16.url, str(tmp_path / "i8"), "--storage-dtype", "int8", "--seed", "5", "-q"]) == 0
    i8 = ActivationStore.open(str(tmp_path / "i8"))
    assert i8.storage_dtype == "int8" and i8.rows_per_chunk == RPC and i8.info.scrambled
    assert i8.reference.digest() == Q.reference_from_rows(x, y).digest()  # the source's first rows
    raw = i8.read_raw(0, ROWS)
    codes, scale = Q.quantize(x[raw.token_ids], *i8.reference.tensors("inputs"), "int8")
    assert np.array_equal(raw.inputs, codes) and np.array_equal(raw.inputs_scale, scale)
    stats = i8.read_norm_stats()  # recomputed: the values changed
    assert stats is not None and stats.count == ROWS
    np.testing.assert_allclose(stats.inputs_mean, RunningMoments.of(i8.read(0, ROWS).inputs).mean, rtol=1e-12)
    # and back: the dequantised values, exactly
    scramble_store(i8.url, str(tmp_path / "back"), ScrambleConfig(storage_dtype="bfloat16", seed=5), progress=False)
    back = ActivationStore.open(str(tmp_path / "back"))
    assert back.storage_dtype == "bfloat16" and back.info.format_version == 1
    by_id = [torch.argsort(store.read(0, ROWS).token_ids) for store in (back, i8)]  # both in token id order
    assert torch.equal(bits(back.read(0, ROWS).inputs[by_id[0]]), bits(i8.read(0, ROWS).inputs[by_id[1]]))


# ------------------------------------------------------------------------------------------------- extraction
T = 32


def int8_config(model: Path, **kw: object) -> ExtractConfig:
    return extract_config(model, **{"tokens": 500, "storage_dtype": "int8", **kw})


@pytest.fixture(scope="module")
def int8_extraction(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """An uninterrupted int8 extraction and the bfloat16 one of the same rows."""
    root = tmp_path_factory.mktemp("int8-extraction")
    i8 = extract(str(root / "i8"), int8_config(tiny_dirs["llama"]), progress=False).url
    bf16 = extract(str(root / "bf16"), int8_config(tiny_dirs["llama"], storage_dtype="bfloat16"), progress=False)
    return i8, bf16.url


def assert_same_raw(a_url: str, b_url: str, *, exact_stats: bool = True) -> None:
    a, b = ActivationStore.open(a_url), ActivationStore.open(b_url)
    assert a.num_rows == b.num_rows and a.reference.digest() == b.reference.digest()
    for x, y in zip(a.read_raw(0, a.num_rows), b.read_raw(0, b.num_rows), strict=True):
        assert np.array_equal(x, y, equal_nan=True)
    sa, sb = a.read_norm_stats(), b.read_norm_stats()
    tol = 0 if exact_stats else 1e-12  # shards merge their moments: equal up to float64 rounding
    np.testing.assert_allclose(sa.inputs_mean, sb.inputs_mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(sa.targets_std, sb.targets_std, rtol=tol, atol=tol)


def test_an_int8_extraction_quantises_the_bfloat16_rows(int8_extraction: tuple[str, str]) -> None:
    i8, bf16 = (ActivationStore.open(u) for u in int8_extraction)
    assert i8.storage_dtype == "int8" and i8.rows_per_chunk == 64 and i8.num_rows == 500
    exact = bf16.read(0, 500)
    assert i8.reference.digest() == Q.reference_from_rows(exact.inputs, exact.targets).digest()
    assert np.array_equal(
        i8.read_raw(0, 500).inputs, Q.quantize(exact.inputs, *i8.reference.tensors("inputs"), "int8")[0]
    )
    assert Q.nmse(i8.read(0, 500).inputs, exact.inputs) < 1e-3
    stats = i8.read_norm_stats()  # folded from the dequantised values, as `clt norm-stats --workers 1` computes them
    again = compute_norm_stats(ActivationStore.open(i8.url, "a"), workers=1, progress=False)
    assert np.array_equal(stats.inputs_mean, again.inputs_mean) and np.array_equal(stats.targets_std, again.targets_std)


def test_an_interrupted_int8_extraction_resumes_to_the_same_store(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, int8_extraction: tuple[str, str]
) -> None:
    from clt_core.extract import extractor

    calls = {"n": 0}
    real = extractor.NNsightCapture.__call__

    def crash(self: object, ids: torch.Tensor) -> object:
        calls["n"] += 1
        if calls["n"] > 8:  # the reference's forward passes (5), then three batches of rows
            raise KeyboardInterrupt
        return real(self, ids)  # type: ignore[arg-type]

    url = str(tmp_path / "resumed")
    monkeypatch.setattr(extractor.NNsightCapture, "__call__", crash)
    with pytest.raises(KeyboardInterrupt):
        extract(url, int8_config(tiny_dirs["llama"]), progress=False)
    partial = ActivationStore.open(url)
    assert 0 < partial.num_rows < 500 and partial.load_reference() is not None
    monkeypatch.setattr(extractor.NNsightCapture, "__call__", real)
    resumed = extract(url, int8_config(tiny_dirs["llama"]), progress=False)
    assert resumed.resumed_from == partial.num_rows
    assert_same_raw(int8_extraction[0], url)
    with pytest.raises(StoreError, match="extracted with storage dtype int8, now fp8; resume with the same") as err:
        extract(url, int8_config(tiny_dirs["llama"], storage_dtype="fp8"), progress=False)
    assert "\n" not in str(err.value)


def test_a_sharded_int8_extraction_equals_the_unsharded_one(
    tiny_dirs: dict[str, Path], tmp_path: Path, int8_extraction: tuple[str, str]
) -> None:
    url = str(tmp_path / "sharded")
    for i in (1, 0):  # the first shard to run, whichever it is, writes the reference; the other uses it
        extract(url, int8_config(tiny_dirs["llama"]), shard=Shard(i, 2), progress=False)
    assert_same_raw(int8_extraction[0], url, exact_stats=False)


def test_one_writer_computes_the_reference_and_the_others_wait_for_it(tmp_path: Path) -> None:
    store = ActivationStore.create(str(tmp_path / "s"), num_layers=L, d_model=D, quantization="int8")
    assert store.load_reference() is None
    x, y = heavy_tailed(64)
    computed: list[int] = []
    release = threading.Event()

    def compute() -> Q.QuantReference:
        computed.append(1)
        release.wait(5)
        return Q.reference_from_rows(x, y)

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        Q.ensure_reference(ActivationStore.open(store.url, "a"), compute).digest())) for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(30)
    assert len(computed) == 1 and len(set(results)) == 1 and len(results) == 3
    assert ActivationStore.open(store.url).reference.digest() == results[0]
    with pytest.raises(StoreError, match="without its complete quantisation reference"):
        ActivationStore.create(str(tmp_path / "t"), num_layers=L, d_model=D, quantization="fp8").writer().append(x, y)


# -------------------------------------------------------------------------------------------------------- S3
@pytest.mark.s3
def test_an_int8_store_on_s3_reads_as_the_local_one(tmp_path: Path, s3_url: str) -> None:
    local, _, _ = quantised_store(str(tmp_path / "s"), "int8")
    scramble_store(local.url, s3_url, ScrambleConfig(seed=1), progress=False)
    remote = ActivationStore.open(s3_url)
    assert remote.storage_dtype == "int8" and remote.reference.digest() == local.reference.digest()
    ids = remote.read_raw(0, ROWS).token_ids
    assert torch.equal(remote.read(0, ROWS).inputs, local.read(0, ROWS).inputs[ids])
    sampler = ActivationSampler(remote, SamplerConfig(batch_size=40, buffer_chunks=2, normalization_method="none"))
    try:
        batch = next(sampler)
    finally:
        sampler.close()
    assert torch.equal(batch.inputs, local.read(0, ROWS).inputs[batch.token_ids.long()])
    fresh = ActivationStore.create(f"{s3_url}-ref", num_layers=L, d_model=D, quantization="fp8")
    reference = Q.ensure_reference(fresh, lambda: local.reference)  # its lease on S3: a conditional put
    assert ActivationStore.open(f"{s3_url}-ref").reference.digest() == reference.digest()


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_storage_dtypes_and_quantisations_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clt_core.data.layout import split_storage_dtype

    with pytest.raises(StoreError) as err:
        split_storage_dtype("int4")
    assert str(err.value) == "unknown storage dtype 'int4'; use one of bfloat16, float16, float32, int8, fp8"
    with pytest.raises(StoreError, match="unknown quantization 'int4'; use one of none, int8, fp8"):
        ActivationStore.create(str(tmp_path / "q"), num_layers=2, d_model=4, quantization="int4")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="a int8 store holds bfloat16 values, not float32"):
        ActivationStore.create(str(tmp_path / "q"), num_layers=2, d_model=4, dtype="float32", quantization="int8")
    for model in (ExtractConfig, ScrambleConfig):
        with pytest.raises(ConfigError) as cerr:
            model.from_dict({"storage_dtype": "int4"})
        assert "\n" not in str(cerr.value) and "storage_dtype" in str(cerr.value) and "fp8" in str(cerr.value)
    with pytest.raises(ConfigError, match="dtype float32 and storage_dtype int8 contradict"):
        make_synthetic_store(str(tmp_path / "c"), SyntheticConfig(rows=4, dtype="float32", storage_dtype="int8"))
    with pytest.raises(SystemExit):
        main(["scramble", "a", "b", "--storage-dtype", "int4"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "invalid choice: 'int4'" in lines[0]


def test_a_store_of_an_unknown_quantisation_or_version_is_refused_in_one_line(tmp_path: Path) -> None:
    store, _, _ = quantised_store(str(tmp_path / "s"), "int8", rows=40)
    group = zarr.open_group(store.url, mode="r+")
    info = dict(group.attrs[INFO_KEY])
    cases = [
        ({**info, "quantization": "int4"}, "quantised as 'int4', which this version of clt-pipeline cannot read"),
        ({**info, "format_version": 1}, "quantization int8 in a format_version 1 store"),
        ({**info, "format_version": 3}, "store format_version 3, this version of clt-pipeline reads 2"),
    ]
    for doc, message in cases:
        group.attrs[INFO_KEY] = doc
        with pytest.raises(CLTError, match=message) as err:
            ActivationStore.open(store.url)
        assert "\n" not in str(err.value)
    group.attrs[INFO_KEY] = info
    doc = json.loads((tmp_path / "s" / "inputs" / "zarr.json").read_text())
    doc["attributes"]["quantization"] = "fp8"  # arrays that contradict the metadata
    (tmp_path / "s" / "inputs" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(
        StoreError, match=r"'inputs' is stored as int8 .*quantization fp8.*metadata says bfloat16 quantised as int8"
    ):
        ActivationStore.open(store.url)


def test_the_pipeline_takes_the_storage_dtype_from_the_extract_config() -> None:
    from flows.config import PipelineConfig, fingerprint

    a, b = PipelineConfig(), PipelineConfig.from_dict({"extract": {"storage_dtype": "int8", "codec": "zstd"}})
    assert b.extract.storage_dtype == "int8" and b.extract.codec == "zstd"
    assert fingerprint(a.extract, 1) != fingerprint(b.extract, 1)
    assert to_storage(torch.ones(1), "bfloat16").dtype == np.uint16  # (the logical dtype's form is unchanged)
