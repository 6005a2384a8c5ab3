"""Bad input to the `clt` command is refused: exit status 2, one line on stderr naming the problem and the fix, and
nothing written (no output created, an existing store or run left byte for byte as it was).

The table of these cases, with the test of each, is docs/reliability.md ("Bad input refused").
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from model_dirs import make_model_dir

from clt_core.cli import main
from clt_core.data.hdf5 import MANIFEST_DTYPE
from clt_core.data.layout import FORMAT_VERSION, INFO_KEY
from clt_core.data.norm_stats import NormStats, compute_norm_stats
from clt_core.data.sampler import ActivationSampler, SamplerConfig
from clt_core.data.store import ActivationStore
from clt_core.errors import StoreError

L, D, RPC, ROWS = 2, 4, 16, 64  # the small store: 4 chunks of 16 rows
BAD_ROWS = (5, 9)  # rows holding NaN/Inf, both in chunk 0
HOOKS = ("--input-hook", "mlp.hook_in", "--output-hook", "mlp.hook_out")  # the model directories name no known hook


# ------------------------------------------------------------------------------------------------------- helpers
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`clt ARGV` in this process: (exit status, stdout, stderr); argparse's own exits count too."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys: pytest.CaptureFixture[str], *argv: str, says: tuple[str, ...]) -> str:
    """Run `clt ARGV`, assert it was refused in exactly one line holding every fragment of `says`; return the line."""
    code, out, err = run(capsys, *argv)
    command = next(a for a in argv if not a.startswith("-"))
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"clt {command}: error: "), lines[0]
    for fragment in says:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself) with its bytes: equal snapshots mean nothing was written."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): p.read_bytes() for p in files}


def siblings(store: Path) -> list[str]:
    """Files written beside a store, other than the writer lease's own files (clt_core.data.lease)."""
    return sorted(p.name for p in store.parent.glob(f"{store.name}*") if p != store and ".lease." not in p.name)


def make_store(
    url: str, *, rows: int = ROWS, layers: int = L, bad: tuple[int, ...] = (), norm_stats: bool = True
) -> str:
    """A float32 store of random rows (token id = row number) in chunks of 16; NaN/Inf in the rows `bad`."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, layers, D, generator=g), torch.randn(rows, layers, D, generator=g)
    for i, row in enumerate(bad):
        if i % 2:
            y[row, -1, 0] = -math.inf
        else:
            x[row, 0, 1] = math.nan
    store = ActivationStore.create(url, num_layers=layers, d_model=D, dtype="float32", rows_per_chunk=RPC)
    with store.writer() as writer:
        writer.append(x, y, torch.arange(rows))
    if norm_stats:
        compute_norm_stats(ActivationStore.open(url, mode="a"), workers=1, progress=False)
    return url


def train_args(data: str, out: Path, *extra: str, settings: bool = True) -> list[str]:
    """A training run of a few steps on the small store (3 training chunks in one window, 1 held out); without
    `settings`, only what a config file cannot say (flags would override the file)."""
    base = ["train", "-q", "--data", data, "--out", str(out), "--device", "cpu"]
    if settings:
        small = "--num-features 8 --k 2 --training-steps 3 --batch-size 16 --buffer-chunks 4 --holdout-fraction 0.25"
        base += [*small.split(), "--eval-rows", "16", "--log-interval", "1", "--checkpoint-interval", "3"]
    return [*base, *extra]


def extract_args(model: Path, out: Path, *extra: str) -> list[str]:
    """Extraction of 64 rows of the packaged text, on the CPU in float32."""
    settings = "--text packaged:kjv --tokens 64 --context-size 32 --compute-dtype float32 --storage-dtype float32"
    return ["extract", "-q", "--out", str(out), "--model", str(model), *settings.split(), "--device", "cpu", *extra]


@pytest.fixture
def store(tmp_path: Path) -> str:
    return make_store(str(tmp_path / "store"))


# ------------------------------------------------------------------------------------------------ config files
@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("rows: [1, 2\n", ("not valid YAML: line 2, column 1: expected ',' or ']'", "fix the file's syntax")),
        ("rows: 10\n  layers: 3\n", ("not valid YAML: line 2, column 9: mapping values are not allowed here",)),
        ("- 1\n- 2\n", ("expected a mapping of keys to values, got list",)),
    ],
)
def test_malformed_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: tuple[str, ...]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    refused(capsys, "make-synthetic", str(tmp_path / "s"), "--config", str(config), says=(str(config), *says))
    refused(capsys, *train_args("unused", tmp_path / "run"), "--config", str(config), says=(str(config), *says))
    assert not (tmp_path / "s").exists() and not (tmp_path / "run").exists()


def test_a_config_path_that_is_not_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, "make-synthetic", str(tmp_path / "s"), "--config", str(tmp_path), says=("cannot read the config",))
    refused(
        capsys,
        "make-synthetic",
        str(tmp_path / "s"),
        "--config",
        str(tmp_path / "none.yaml"),
        says=("config file not found",),
    )
    assert not (tmp_path / "s").exists()


def test_unknown_keys_are_all_named_even_beside_other_errors(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A top-level, a nested and an invalid k together: every one is reported (the k check used to hide the rest)."""
    config = tmp_path / "train.yaml"
    config.write_text("bogus: 1\nmodel:\n  num_features: 8\n  k: 9\nsampler:\n  batchsize: 16\n")
    line = refused(
        capsys,
        *train_args(store, tmp_path / "run", settings=False),
        "--config",
        str(config),
        says=(
            f"{config}: unknown key 'bogus'",
            f"{config}: unknown key 'sampler.batchsize'",
            f"{config}: model: k=9 is more than the 8 features of a layer; lower k or raise num_features",
        ),
    )
    assert line.count("unknown key") == 2
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------- sizes
SIZES = {
    "batch size": (["--batch-size", "0"], "sampler.batch_size: Input should be greater than or equal to 1 (got 0)"),
    "num_features": (["--num-features", "0"], "model.num_features: Input should be greater than or equal to 1"),
    "training steps": (["--training-steps", "-5"], "training_steps: Input should be greater than or equal to 1"),
    "buffer chunks": (["--buffer-chunks", "0"], "sampler.buffer_chunks: Input should be greater than or equal to 1"),
    "eval rows": (["--eval-rows", "0"], "eval_rows: Input should be greater than or equal to 1"),
    "nproc": (["--nproc", "0"], "argument --nproc: must be at least 1, got 0; see `clt train --help`"),
}


@pytest.mark.parametrize("case", list(SIZES))
def test_non_positive_training_sizes(store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    flags, message = SIZES[case]
    refused(capsys, *train_args(store, tmp_path / "run"), *flags, says=(message,))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--context-size", "0"], "context_size: Input should be greater than or equal to 2 (got 0)"),
        (["--chunk-rows", "0"], "chunk_rows: Input should be greater than or equal to 1 (got 0)"),
        (["--tokens", "-1"], "tokens: Input should be greater than or equal to 1 (got -1)"),
        (["--batch-size", "0"], "batch_size: Input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_non_positive_extraction_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    refused(capsys, *extract_args(tmp_path / "model", tmp_path / "out"), *flags, says=(message,))
    assert not (tmp_path / "out").exists()


def test_non_positive_sizes_of_the_data_commands(store: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(Path(store))
    refused(capsys, "sample", store, "--batches", "0", says=("argument --batches: must be at least 1, got 0",))
    refused(capsys, "sample", store, "--batch-size", "-2", says=("batch_size: Input should be greater than or equal",))
    refused(capsys, "norm-stats", store, "--workers", "0", says=("argument --workers: must be at least 1",))
    refused(capsys, "scramble", store, str(tmp_path / "dst"), "--rows-per-chunk", "0", says=("rows_per_chunk",))
    refused(
        capsys,
        "import-hdf5",
        str(tmp_path),
        str(tmp_path / "dst"),
        "--rows-per-chunk",
        "0",
        says=("argument --rows-per-chunk: must be at least 1",),
    )
    refused(capsys, "make-synthetic", str(tmp_path / "dst"), "--rows-per-chunk", "0", says=("rows_per_chunk",))
    refused(capsys, "evaluate", str(tmp_path), "--max-rows", "0", says=("max_rows: Input should be greater",))
    refused(capsys, "convert", str(tmp_path), "--out", str(tmp_path / "dst"), "--batches", "0", says=("batches",))
    refused(capsys, "norm-stats", store, "--workers", "two", says=("expected a positive integer, got 'two'",))
    assert snapshot(Path(store)) == before and not (tmp_path / "dst").exists()


# ---------------------------------------------------------------------------------------------------- top-k k
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_k_above_the_features(store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], activation: str) -> None:
    argv = [*train_args(store, tmp_path / "run"), "--activation-fn", activation]
    refused(capsys, *argv, "--k", "9", says=("model: k=9 is more than the 8 features of a layer; lower k",))
    # over all layers together (global scope): the store's 2 layers of 8 features hold 16
    refused(
        capsys,
        *argv,
        "--topk-scope",
        "global",
        "--k",
        "17",
        says=(store, "k=17 is more than the 16 features of all layers together; lower k"),
    )
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- language-model inputs
def test_context_size_beyond_the_model(tiny_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    refused(
        capsys,
        *extract_args(tiny_dirs["gpt2"], tmp_path / "out"),
        "--context-size",
        "257",
        says=("context_size 257 is larger than", "maximum of 256; lower --context-size"),
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--input-template", "transformer.h.{layer}.nope"],
            ("no module 'transformer.h.0.nope'", "candidates for layer 0: transformer.h.0.mlp"),
        ),
        (["--output-template", "transformer.h.0.mlp"], ("'transformer.h.0.mlp' must contain '{layer}'",)),
        (["--input-template", "transformer.h.{i}.mlp"], ("'transformer.h.{i}.mlp'",)),
    ],
)
def test_wrong_capture_templates(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], says: tuple[str, ...]
) -> None:
    refused(capsys, *extract_args(tiny_dirs["gpt2"], tmp_path / "out"), *flags, says=says)
    assert not (tmp_path / "out").exists()


def test_a_truncated_language_model(tiny_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    model = tmp_path / "gpt2"
    shutil.copytree(tiny_dirs["gpt2"], model)
    weights = model / "model.safetensors"
    for size in (len(weights.read_bytes()) // 2, 5):  # cut in the tensors, then in the header
        weights.write_bytes(weights.read_bytes()[:size])
        refused(
            capsys,
            *extract_args(model, tmp_path / "out"),
            says=(
                f"cannot load model from {model}: a weights file is truncated or corrupt",
                "download or save the model again",
            ),
        )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ stores
def test_a_store_of_another_format_version(
    tiny_dirs: dict[str, Path], store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    group = zarr.open_group(store, mode="r+")
    group.attrs[INFO_KEY] = {**group.attrs[INFO_KEY], "format_version": FORMAT_VERSION + 1}
    before = snapshot(Path(store))
    says = (
        store,
        f"store format_version {FORMAT_VERSION + 1}, this version of clt-pipeline reads {FORMAT_VERSION}",
        "convert the store or use a matching clt-pipeline",
    )
    refused(capsys, *train_args(store, tmp_path / "run"), says=says)
    refused(capsys, "norm-stats", store, "-q", says=says)  # opens it for writing
    refused(capsys, "scramble", store, str(tmp_path / "dst"), "-q", says=says)
    refused(capsys, *extract_args(tiny_dirs["gpt2"], Path(store)), says=says)  # would resume (append to) it
    assert snapshot(Path(store)) == before and siblings(Path(store)) == []
    assert not (tmp_path / "run").exists() and not (tmp_path / "dst").exists()


def test_a_model_config_of_other_geometry_than_the_store(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("model:\n  num_features: 8\n  k: 2\n  d_model: 16\n")
    refused(
        capsys,
        *train_args(store, tmp_path / "run", settings=False),
        "--config",
        str(config),
        says=(f"model.d_model=16 but the store {store} has d_model=4", "leave model.d_model unset"),
    )
    assert not (tmp_path / "run").exists()


def test_appending_to_a_store_of_another_model(tiny_dirs: dict[str, Path], tmp_path: Path, capsys) -> None:
    url = make_store(str(tmp_path / "store"), layers=3)  # the tiny GPT-2 has 2 layers
    before = snapshot(Path(url))
    refused(
        capsys,
        *extract_args(tiny_dirs["gpt2"], Path(url)),
        says=(url, "the store has num_layers=3, but 2 is expected; use a matching store"),
    )
    assert snapshot(Path(url)) == before and siblings(Path(url)) == []


def test_converting_on_a_store_of_another_model(store: str, tmp_path: Path, capsys) -> None:
    model, _ = make_model_dir(tmp_path / "model", activation="batchtopk")  # 3 layers of width 16
    refused(
        capsys,
        "convert",
        str(model),
        "--out",
        str(tmp_path / "out"),
        "--data",
        store,
        "-q",
        says=(store, "the store has num_layers=2, but 3 is expected; use a matching store"),
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- NaN and Inf
def test_nonfinite_rows_are_refused_by_default_with_their_row_numbers(tmp_path: Path, capsys) -> None:
    url = make_store(str(tmp_path / "store"), bad=BAD_ROWS)
    refused(
        capsys,
        *train_args(url, tmp_path / "run"),
        says=(
            f"{url}: row(s) 5, 9 hold NaN/Inf (found reading rows 0..15)",
            f"`clt verify {url}` lists every such row",
            "--nonfinite skip",
        ),
    )
    assert not (tmp_path / "run").exists()  # found in the first window, before anything is written
    code, out, _ = run(capsys, "verify", url, "-q")
    assert code == 1 and "2 row(s) hold NaN/Inf in inputs or targets: row 5, 9" in out
    assert "warning" not in out  # the norm stats leave those rows out: not stale


def test_nonfinite_rows_are_skipped_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = make_store(str(tmp_path / "store"), bad=(*BAD_ROWS, 60))  # row 60: in the held-out chunk
    code, out, err = run(capsys, *train_args(url, tmp_path / "run"), "--nonfinite", "skip")
    assert code == 0, err
    assert "NMSE" in out and "nan" not in out.lower()
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for r in losses for v in r.values() if isinstance(v, float))


def test_a_run_stopped_by_nonfinite_rows_resumes_skipping_them(tmp_path: Path, capsys) -> None:
    """NaN in the last training window: the run stops after its checkpoints, and `--resume --nonfinite skip` goes on
    from them (changing that setting alone is allowed on resume)."""
    last = int(np.random.default_rng([0, 0]).permutation(3)[-1])  # the sampler's epoch-0 chunk order (seed 0)
    url = make_store(str(tmp_path / "store"), bad=(last * RPC + 3,))
    out = tmp_path / "run"
    one_window = ["--buffer-chunks", "1", "--checkpoint-interval", "1"]
    refused(capsys, *train_args(url, out, *one_window), says=(f"row(s) {last * RPC + 3} hold NaN/Inf",))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2"]  # checkpoints intact
    assert not (out / "final").exists()
    code, stdout, err = run(capsys, *train_args(url, out, *one_window, "--resume", "--nonfinite", "skip"))
    assert code == 0 and "trained 3 steps" in stdout, err


def test_skipping_leaves_out_exactly_the_bad_rows_and_resumes_exactly(tmp_path: Path) -> None:
    bad = {5, 9, 40}
    store = ActivationStore.open(make_store(str(tmp_path / "store"), bad=tuple(sorted(bad))))
    config = SamplerConfig(batch_size=10, buffer_chunks=2, normalization_method="none", nonfinite="skip")
    with ActivationSampler(store, config) as sampler:
        rows = [next(sampler).token_ids.clone() for _ in range(12)]
        epoch = torch.cat(rows)[: ROWS - len(bad)]
        assert sorted(epoch.tolist()) == sorted(set(range(ROWS)) - bad)  # each good row once per epoch
        assert torch.isfinite(torch.cat([next(sampler).inputs for _ in range(10)])).all()
    with ActivationSampler(store, config) as first:
        for _ in range(4):  # past the first window (32 rows less the skipped ones)
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
    with ActivationSampler(store, config) as resumed:
        resumed.load_state_dict(state)
        assert all(torch.equal(next(resumed).token_ids, expected) for expected in rows[4:])
    strict = config.model_copy(update={"nonfinite": "error"})
    message = r"row\(s\) (5, 9|40) hold NaN/Inf \(found reading rows (0|32)\.\."
    with ActivationSampler(store, strict) as sampler, pytest.raises(StoreError, match=message):
        next(sampler)


def test_nonfinite_norm_stats_are_refused(store: str, tmp_path: Path, capsys) -> None:
    s = ActivationStore.open(store, mode="a")
    stats = s.read_norm_stats()
    stats.inputs_mean[0, 0] = np.nan  # as computed over a NaN row by an older version
    s.write_norm_stats(stats)
    refused(
        capsys,
        *train_args(store, tmp_path / "run"),
        says=(f"{store}: its norm stats hold NaN/Inf", f"recompute them with `clt norm-stats {store}`"),
    )
    assert not (tmp_path / "run").exists()


def test_norm_stats_leave_nonfinite_rows_out(tmp_path: Path) -> None:
    url = make_store(str(tmp_path / "store"), bad=BAD_ROWS)
    stats = ActivationStore.open(url).read_norm_stats()
    assert isinstance(stats, NormStats) and stats.count == ROWS - len(BAD_ROWS)
    rows = ActivationStore.open(url).read(0, ROWS)
    good = [i for i in range(ROWS) if i not in BAD_ROWS]
    expected = rows.inputs[good].double().mean(dim=0).numpy()
    assert np.allclose(stats.inputs_mean, expected) and np.isfinite(stats.targets_std).all()


# ------------------------------------------------------------------------------------------------- checkpoints
def test_a_truncated_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = make_model_dir(tmp_path / "model", activation="jumprelu")  # one that export takes
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    says = (f"{weights} is not a valid safetensors file", "the checkpoint is damaged")
    refused(capsys, "convert", str(model), "--out", str(tmp_path / "out"), "-q", says=says)
    refused(capsys, "evaluate", str(model), "--device", "cpu", "-q", says=says)
    refused(capsys, "export", str(model), "--out", str(tmp_path / "out"), *HOOKS, says=says)
    assert sorted(p.name for p in model.iterdir()) == sorted(
        ["config.json", "model.safetensors", "normalization.safetensors", "source.json"]
    )
    assert not (tmp_path / "out").exists()


def test_weights_of_another_architecture_than_config_json(tmp_path: Path, capsys) -> None:
    model, _ = make_model_dir(tmp_path / "model", activation="batchtopk")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_features": 64}))
    refused(
        capsys,
        "convert",
        str(model),
        "--out",
        str(tmp_path / "out"),
        "-q",
        says=(
            f"{model}: model.safetensors holds W_enc of shape (3, 32, 16), but config.json describes "
            "(3, 64, 16): the weights and config.json are of different models",
        ),
    )
    assert not (tmp_path / "out").exists()


def test_a_config_json_of_another_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = make_model_dir(tmp_path / "model", activation="batchtopk")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "activation_fn": "gated", "n_heads": 4}))
    says = (
        f"{model}: not a checkpoint of this clt-pipeline's architecture",
        "activation_fn: Input should be",
        "(got 'gated')",
        "unknown key 'n_heads'",
    )
    refused(capsys, "evaluate", str(model), "--device", "cpu", "-q", says=says)
    refused(capsys, "convert", str(model), "--out", str(tmp_path / "out"), "-q", says=says)
    (model / "config.json").write_text('{"num_features": ')
    refused(
        capsys,
        "export",
        str(model),
        "--out",
        str(tmp_path / "out"),
        *HOOKS,
        says=(f"{model / 'config.json'}: not valid JSON", "the checkpoint is damaged"),
    )
    assert not (tmp_path / "out").exists() and not (model / "evaluation").exists()


def test_resuming_a_run_of_another_architecture(store: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(store, out))
    assert code == 0, err
    before = snapshot(out)
    refused(
        capsys,
        *train_args(store, out, "--num-features", "16", "--training-steps", "6", "--resume"),
        says=(
            f"{out / 'checkpoints' / 'step_3'} was trained with other settings (model.num_features: 8 -> 16)",
            "resume with the same config",
        ),
    )
    refused(
        capsys,
        *train_args(store, out, "--activation-fn", "relu", "--resume"),
        says=("model.activation_fn: 'batchtopk' -> 'relu'",),
    )
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------------- HDF5
def seed_dir(root: Path, rows: tuple[int, ...] = (20, 12)) -> Path:
    """A minimal seed-library HDF5 directory: chunk files, a per-chunk index.bin and metadata.json."""
    root.mkdir()
    for i, n in enumerate(rows):
        with h5py.File(root / f"chunk_{i}.hdf5", "w") as h5:
            for layer in range(L):
                h5.create_dataset(f"layer_{layer}/inputs", data=np.ones((n, D), np.float32))
                h5.create_dataset(f"layer_{layer}/targets", data=np.ones((n, D), np.float32))
    offsets = np.cumsum((0, *rows))[:-1]
    np.array(list(zip(range(len(rows)), rows, offsets, strict=True)), MANIFEST_DTYPE).tofile(root / "index.bin")
    (root / "metadata.json").write_text(json.dumps({"num_layers": L, "d_model": D, "dtype": "float32"}))
    return root


@pytest.mark.parametrize(
    ("manifest", "says"),
    [
        ([(0, 20, 0), (1, 15, 20)], ("index.bin: per-chunk records, but chunk_1.hdf5 holds 12 rows",)),
        (
            [(0, 20, 0), (2, 12, 20)],
            ("index.bin: per-chunk records, but chunk_2.hdf5 (or .h5) is referenced but missing",),
        ),
        (b"\0" * 12, ("index.bin: 12 bytes fits neither",)),
        (np.array([[0, r] for r in range(20)] + [[1, 0]] * 12, np.uint32), ("exactly once",)),
    ],
    ids=["rows", "chunk id", "size", "per-row"],
)
def test_an_hdf5_directory_with_a_wrong_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest: object, says: tuple[str, ...]
) -> None:
    src = seed_dir(tmp_path / "seed")
    if isinstance(manifest, bytes):
        (src / "index.bin").write_bytes(manifest)
    elif isinstance(manifest, np.ndarray):
        manifest.tofile(src / "index.bin")
    else:
        np.array(manifest, MANIFEST_DTYPE).tofile(src / "index.bin")
    refused(capsys, "import-hdf5", str(src), str(tmp_path / "store"), "-q", says=(str(src), *says))
    assert not (tmp_path / "store").exists()


def test_a_good_hdf5_directory_imports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control for the manifest cases above: the same directory, untouched, imports."""
    code, out, err = run(capsys, "import-hdf5", str(seed_dir(tmp_path / "seed")), str(tmp_path / "store"), "-q")
    assert code == 0 and "imported 32 rows" in out, err


# -------------------------------------------------------------------------------------------- model registry
def test_a_registry_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = tmp_path / "mlflow.db"
    refused(
        capsys,
        "models",
        "get",
        "missing@champion",
        "--out",
        str(tmp_path / "got"),
        "--tracking-uri",
        f"sqlite:///{database}",
        says=(f"no MLflow database at {database}", "check --tracking-uri"),
    )
    assert not database.exists() and not (tmp_path / "got").exists()  # no empty registry made on the way


def test_a_registered_model_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_registered_models()  # an empty registry
    capsys.readouterr()
    refused(
        capsys,
        "models",
        "get",
        "missing@champion",
        "--out",
        str(tmp_path / "got"),
        "--tracking-uri",
        uri,
        says=("no registered model 'missing@champion'", "see `clt models list`"),
    )
    assert not (tmp_path / "got").exists()
