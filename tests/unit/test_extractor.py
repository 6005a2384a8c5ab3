"""Extraction through nnsight on tiny random models: exact activations, exact row counts, resume, bad input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import extract_config

from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.store import ActivationStore
from clt_core.data.verify import verify_store
from clt_core.errors import CLTError
from clt_core.extract.extractor import extract
from clt_core.lm.capture import capture_points, capture_with_hooks
from clt_core.lm.loading import resolve_model
from clt_core.lm.windows import iter_windows, limit_rows

T = 32


config = extract_config


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_stored_rows_equal_plain_forward_hooks(tiny_dirs: dict[str, Path], tmp_path: Path, kind: str) -> None:
    cfg = config(tiny_dirs[kind])
    summary = extract(str(tmp_path / "store"), cfg, progress=False)
    store = ActivationStore.open(summary.url)
    assert store.num_rows == cfg.tokens == summary.rows  # exactly, no overshoot

    loaded = resolve_model(cfg.model)
    points = capture_points(loaded.model)
    windows = list(limit_rows(iter_windows(cfg.text, loaded.tokenizer, T), cfg.tokens))
    ids = torch.from_numpy(np.stack([w.token_ids for w in windows]))
    keep = torch.from_numpy(np.stack([w.keep for w in windows]))
    inputs, targets = capture_with_hooks(loaded.model, points, ids)
    rows = store.read(0, store.num_rows)
    assert torch.equal(rows.inputs, inputs[keep])
    assert torch.equal(rows.targets, targets[keep])
    assert torch.equal(rows.token_ids, ids[keep].int())
    assert not keep[:, 0].any(), "BOS rows are excluded"
    assert store.info.model["weights_hash"] == loaded.weights_hash
    assert store.info.hook_templates["input_template"] == points.input_template


def test_norm_stats_are_written_in_the_same_pass(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    summary = extract(str(tmp_path / "s"), config(tiny_dirs["llama"], storage_dtype="bfloat16"), progress=False)
    store = ActivationStore.open(summary.url, "a")
    written = store.read_norm_stats()
    assert written is not None and written.count == 300
    again = compute_norm_stats(store, workers=1, progress=False)
    assert np.array_equal(written.inputs_mean, again.inputs_mean)
    assert np.array_equal(written.targets_std, again.targets_std)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_storage_dtypes_store_the_captured_values_exactly(
    tiny_dirs: dict[str, Path], tmp_path: Path, dtype: str
) -> None:
    reference = extract(str(tmp_path / "f32"), config(tiny_dirs["gpt2"]), progress=False)
    other = extract(str(tmp_path / dtype), config(tiny_dirs["gpt2"], storage_dtype=dtype), progress=False)
    a, b = ActivationStore.open(reference.url), ActivationStore.open(other.url)
    torch_dtype = getattr(torch, dtype)
    assert torch.equal(b.read(0, 300).inputs, a.read(0, 300).inputs.to(torch_dtype))


def test_an_interrupted_extraction_resumes_to_the_same_store(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tiny_dirs["llama"], storage_dtype="bfloat16", tokens=500)
    whole = extract(str(tmp_path / "whole"), cfg, progress=False)

    from clt_core.extract import extractor

    calls = {"n": 0}
    real = extractor.NNsightCapture.__call__

    def crash_after_three(self, ids):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(self, ids)

    monkeypatch.setattr(extractor.NNsightCapture, "__call__", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        extract(str(tmp_path / "resumed"), cfg, progress=False)
    partial = ActivationStore.open(str(tmp_path / "resumed"))
    assert 0 < partial.num_rows < 500 and partial.num_rows % 64 == 0
    monkeypatch.setattr(extractor.NNsightCapture, "__call__", real)
    resumed = extract(str(tmp_path / "resumed"), cfg, progress=False)
    assert resumed.resumed_from == partial.num_rows
    a, b = ActivationStore.open(whole.url), ActivationStore.open(resumed.url)
    assert torch.equal(a.read(0, 500).inputs.view(torch.uint16), b.read(0, 500).inputs.view(torch.uint16))
    assert torch.equal(a.read(0, 500).token_ids, b.read(0, 500).token_ids)
    sa, sb = a.read_norm_stats(), b.read_norm_stats()
    assert np.array_equal(sa.inputs_mean, sb.inputs_mean) and np.array_equal(sa.targets_std, sb.targets_std)
    # A finished store is not extracted again.
    assert extract(str(tmp_path / "resumed"), cfg, progress=False).rows_this_run == 0


def test_resuming_with_other_settings_is_refused(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    extract(url, config(tiny_dirs["gpt2"]), progress=False)
    with pytest.raises(CLTError, match=r"other settings.*--overwrite"):
        extract(url, config(tiny_dirs["gpt2"], context_size=16), progress=False)
    with pytest.raises(CLTError, match="num_layers=2, but 3 is expected"):
        extract(url, config(tiny_dirs["llama"], storage_dtype="float32"), progress=False)


def test_bad_inputs_are_one_clear_line(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (config(tiny_dirs["gpt2"], tokens=10**9), "corpus 'packaged:kjv' holds"),
        (config(tiny_dirs["gpt2"], context_size=100_000), "larger than"),
        (config(tiny_dirs["gpt2"], input_template="transformer.h.{layer}.nope"), "nope"),
        (config(tmp_path / "missing-model"), "not found"),
    ]
    for cfg, message in cases:
        with pytest.raises(CLTError, match=message) as info:
            extract(str(tmp_path / "bad"), cfg, progress=False)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "bad").exists(), "nothing is written before the inputs are known to be good"


def test_a_full_disk_is_one_clear_line_and_the_store_resumes_elsewhere(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs here: {mounted.stderr.decode().strip()}")
    cfg = config(tiny_dirs["llama"], tokens=2000)  # about 3 MB of float32 rows
    try:
        with pytest.raises(CLTError, match="no space left on device") as info:
            extract(str(small / "store"), cfg, progress=False)
        assert "\n" not in str(info.value)
        committed = ActivationStore.open(str(small / "store")).num_rows
        assert 0 < committed < 2000 and committed % 64 == 0
        assert verify_store(str(small / "store"), progress=False).ok
        shutil.copytree(small / "store", tmp_path / "moved")  # the user moves it to a bigger disk and reruns
    finally:
        subprocess.run(["umount", str(small)], check=True)
    resumed = extract(str(tmp_path / "moved"), cfg, progress=False)
    assert resumed.resumed_from == committed
    whole = extract(str(tmp_path / "whole"), cfg, progress=False)
    a, b = ActivationStore.open(whole.url).read(0, 2000), ActivationStore.open(resumed.url).read(0, 2000)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert torch.equal(a.token_ids, b.token_ids)
