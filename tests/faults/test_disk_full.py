"""A full disk during a scramble or a training checkpoint: one clear line, and nothing earlier is lost (the extraction
case is tests/unit/test_extractor.py::test_a_full_disk_is_one_clear_line_and_the_store_resumes_elsewhere)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.sampler import SamplerConfig
from clt_core.data.scramble import ScrambleConfig, scramble_store
from clt_core.data.store import ActivationStore, store_exists
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.data.verify import verify_store
from clt_core.errors import CLTError
from clt_core.model.config import CLTConfig
from clt_core.train.config import TrainConfig
from clt_core.train.trainer import checkpoints, train


def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from _tmpfs(tmp_path / "small", "2m")


def _store(url: str, rows: int = 8192) -> str:
    make_synthetic_store(url, SyntheticConfig(rows=rows, num_layers=3, d_model=32, num_features=64,
                                              active_per_token=4, rows_per_chunk=256, dtype="float32"))  # fmt: skip
    compute_norm_stats(ActivationStore.open(url, "a"), progress=False)
    return url


def test_a_scramble_onto_a_full_disk_is_one_line_and_leaves_no_partial_store(small_disk: Path, tmp_path: Path) -> None:
    src = _store(str(tmp_path / "src"))  # 8192 rows x 2 x 3 x 32 float32 = 6.3 MB, more than the 2 MB disk
    with pytest.raises(CLTError, match="no space left on device") as info:
        scramble_store(src, str(small_disk / "scrambled"), ScrambleConfig(tmp_dir=str(tmp_path)), progress=False)
    assert "\n" not in str(info.value)
    assert not store_exists(str(small_disk / "scrambled"))  # a half-written scramble never looks like a store
    assert verify_store(src, progress=False).ok  # the source is untouched


def test_a_checkpoint_onto_a_full_disk_is_one_line_and_the_last_checkpoint_still_resumes(
    small_disk: Path, tmp_path: Path
) -> None:
    store = _store(str(tmp_path / "store"), rows=4096)
    cfg = TrainConfig(data=store, output_dir=str(small_disk / "run"), training_steps=400, checkpoint_interval=1,
                      keep_checkpoints=1000, eval_interval=1000, log_interval=10, eval_rows=256,
                      model=CLTConfig(num_features=256, activation_fn="relu"),
                      sampler=SamplerConfig(batch_size=128, holdout_fraction=0.1))  # fmt: skip
    with pytest.raises(CLTError, match="no space left on device") as info:  # ~0.3 MB per checkpoint: full in a few
        train(cfg, progress=False)
    assert "\n" not in str(info.value)
    saved = checkpoints(small_disk / "run")
    assert saved and not (small_disk / "run" / "final").exists()
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-r", str(small_disk / "run"), str(moved)], check=True)  # onto a bigger disk
    last = int(saved[-1].name.removeprefix("step_"))
    resumed = train(cfg.model_copy(update={"output_dir": str(moved), "training_steps": last + 2}), resume=True,
                    progress=False)  # fmt: skip
    assert resumed.final.exists() and (moved / "checkpoints" / f"step_{last + 2}").exists()
