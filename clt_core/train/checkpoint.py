"""Step checkpoints: a model directory (model/directory.py) plus what resuming needs, all unsharded, so a run saved
with N feature shards resumes with any other number.

Beside the model's files a checkpoint holds `optimizer.safetensors` (Adam moments and step per parameter, full),
`rng.safetensors` (the torch RNG states) and `trainer_state.json` (step, sampler position, schedules). Nothing is
pickled; a checkpoint directory is either complete or absent (`write_atomically`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from clt_core.data.sampler import Normalizer
from clt_core.errors import ConfigError
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.directory import (
    full_state,
    gather_full,
    load_weights,
    local_slice,
    read_tensors,
    write_atomically,
    write_model,
)
from clt_core.train.optim import MixedAdam


def optimizer_state(model: CrossLayerTranscoder, optimizer: MixedAdam) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                out[f"{key}.{name}"] = gather_full(model, name, state[key]).cpu().contiguous()
        if "step" in state:
            out[f"step.{name}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).cpu()
    return out


def save_checkpoint(
    path: Path,
    model: CrossLayerTranscoder,
    optimizer: MixedAdam,
    trainer_state: dict[str, Any],
    normalizer: Normalizer | None = None,
    source: dict[str, Any] | None = None,
) -> None:
    """Write a step checkpoint at `path` (collective: all ranks call it, rank 0 writes)."""
    weights = full_state(model)
    moments = optimizer_state(model, optimizer)
    if model.shards.rank != 0:
        return

    def fill(tmp: Path) -> None:
        write_model(tmp, model.config, weights, normalizer, source)
        save_file(moments, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))

    write_atomically(path, fill)


def load_training_state(path: Path, model: CrossLayerTranscoder, optimizer: MixedAdam) -> dict[str, Any]:
    """Restore weights, optimiser moments and RNG; return the trainer state."""
    load_weights(path, model)
    moments = read_tensors(path / "optimizer.safetensors")
    for name, param in model.named_parameters():
        if f"exp_avg.{name}" not in moments:
            continue
        optimizer.state[param] = {
            "step": moments[f"step.{name}"].reshape(()).clone(),
            "exp_avg": local_slice(model, name, moments[f"exp_avg.{name}"]).to(param.device).clone(),
            "exp_avg_sq": local_slice(model, name, moments[f"exp_avg_sq.{name}"]).to(param.device).clone(),
        }
    rng = read_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A step checkpoint's `trainer_state.json` (step, sampler position, the run's settings)."""
    file = Path(path) / "trainer_state.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file} is missing: the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file} is not readable JSON ({err}); the checkpoint is damaged") from None
