"""A checkpoint cut short (killed while saving, or damaged) is never resumed from: it is ignored with a warning."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.sampler import SamplerConfig
from clt_core.data.store import ActivationStore
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.model.config import CLTConfig
from clt_core.train.config import TrainConfig
from clt_core.train.trainer import train


def test_partial_checkpoints_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = str(tmp_path / "store")
    make_synthetic_store(store, SyntheticConfig(rows=4096, num_layers=2, d_model=16, num_features=32,
                                                active_per_token=4, rows_per_chunk=256, dtype="float32"))  # fmt: skip
    compute_norm_stats(ActivationStore.open(store, "a"), progress=False)
    cfg = TrainConfig(data=store, output_dir=str(tmp_path / "run"), training_steps=10, checkpoint_interval=5,
                      eval_interval=1000, log_interval=1, eval_rows=256, keep_checkpoints=5,
                      model=CLTConfig(num_features=32, activation_fn="relu"),
                      sampler=SamplerConfig(batch_size=128, holdout_fraction=0.1))  # fmt: skip
    run = train(cfg, progress=False).output_dir
    ckpts = run / "checkpoints"
    shutil.rmtree(run / "final")
    # What a SIGKILL during a save leaves (the temporary directory), and a step directory damaged afterwards.
    shutil.copytree(ckpts / "step_10", ckpts / ".step_15.tmp")
    (ckpts / ".step_15.tmp" / "model.safetensors").write_bytes(b"\x00" * 10)
    shutil.copytree(ckpts / "step_10", ckpts / "step_20")
    (ckpts / "step_20" / "trainer_state.json").unlink()

    with caplog.at_level(logging.WARNING, logger="clt_core.train.trainer"):
        resumed = train(cfg.model_copy(update={"training_steps": 12}), resume=True, progress=False)
    warned = [r.getMessage() for r in caplog.records]
    assert any(".step_15.tmp" in m and "ignoring the partial checkpoint" in m for m in warned), warned
    assert any("step_20 " in m and "ignoring the partial checkpoint" in m for m in warned), warned
    assert resumed.final.exists() and (ckpts / "step_12").exists()  # resumed from step_10, not from the damaged ones
