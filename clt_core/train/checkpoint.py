"""Checkpoints: unsharded, so a run saved with N feature shards resumes with any other number.

A checkpoint directory (a "model directory": also what `clt convert` writes) holds `config.json` (the CLTConfig),
`model.safetensors` (full parameters: `W_enc [L,F,d]`, `b_enc [L,F]`, `W_dec.{s} [F,L-s,d]`, `b_dec [L,d]`,
`log_threshold [L,F]`), `normalization.safetensors` (the `[L,d]` mean and std the model's inputs and targets were
standardised with; absent when training used none), `source.json` (the training store's URL and metadata: the
language model, its hook templates, context size), and for resuming
`optimizer.safetensors` (Adam moments and step per parameter, also full) and `trainer_state.json` (step, sampler
position, schedules, RNG state). Nothing is pickled. It is written to a temporary directory and renamed into place,
so a checkpoint directory is either complete or absent.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clt_core.config import format_validation_error
from clt_core.data.sampler import Normalizer
from clt_core.errors import CLTError, ConfigError
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.parallel import FeatureShards
from clt_core.train.optim import MixedAdam

NORMALIZATION_FILE = "normalization.safetensors"
SOURCE_FILE = "source.json"


def feature_dim(name: str) -> int | None:
    """The dimension along which a parameter is split over feature shards (None: replicated)."""
    if name.startswith("W_dec."):
        return 0
    return None if name == "b_dec" else 1


def gather_full(model: CrossLayerTranscoder, name: str, local: torch.Tensor) -> torch.Tensor:
    dim = feature_dim(name)
    return local if dim is None else model.shards.all_gather_cat(local.detach(), dim=dim)


def local_slice(model: CrossLayerTranscoder, name: str, full: torch.Tensor) -> torch.Tensor:
    dim = feature_dim(name)
    if dim is None:
        return full
    lo, hi = model.feature_range
    return full.narrow(dim, lo, hi - lo)


def model_state(model: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters, on the CPU; every rank must call it (it gathers)."""
    return {n: gather_full(model, n, p).cpu().contiguous() for n, p in model.named_parameters()}


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
    optimizer: MixedAdam | None = None,
    trainer_state: dict[str, Any] | None = None,
    normalizer: Normalizer | None = None,
    source: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint at `path` (collective: all ranks call it, rank 0 writes)."""
    weights = model_state(model)
    moments = optimizer_state(model, optimizer) if optimizer is not None else None
    if model.shards.rank != 0:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(model.config.model_dump_json(indent=2))
        save_file(weights, str(tmp / "model.safetensors"))
        write_model_extras(tmp, normalizer, source)
        if moments is not None:
            save_file(moments, str(tmp / "optimizer.safetensors"))
        if trainer_state is not None:
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(tmp / "rng.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)  # the earlier checkpoints stay as they were
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
            raise CLTError(
                f"{path}: no space left on device while writing the checkpoint; free space, or move the run to a "
                "bigger disk, and continue it with --resume"
            ) from None
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or one line saying it is missing or damaged (safetensors never runs code from a file,
    unlike a pickle, so a forged file can only fail to parse)."""
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise ConfigError(f"{file} is missing: the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{file} is not a valid safetensors file ({err}); the checkpoint is damaged") from None


def write_model_extras(path: Path, normalizer: Normalizer | None, source: dict[str, Any] | None) -> None:
    """The files that make a model directory self-contained: its normalisation and its source."""
    if normalizer is not None:
        save_file({k: v.contiguous() for k, v in normalizer.state_dict().items()}, str(path / NORMALIZATION_FILE))
    if source is not None:
        (path / SOURCE_FILE).write_text(json.dumps(source, indent=2))


def read_normalizer(path: str | Path) -> Normalizer | None:
    """The normalisation a model was trained behind (None: it saw raw activations)."""
    file = Path(path) / NORMALIZATION_FILE
    return Normalizer.from_state_dict(read_tensors(file)) if file.exists() else None


def read_source(path: str | Path) -> dict[str, Any]:
    """`{"data": store URL, "store": the store's metadata}` of the model's training data ({} if unknown)."""
    file = Path(path) / SOURCE_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def read_config(path: Path) -> CLTConfig:
    """A checkpoint's CLTConfig; one line when it is missing, not JSON, or of another architecture."""
    file = Path(path) / "config.json"
    try:
        return CLTConfig.model_validate_json(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not a checkpoint (no config.json)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: cannot be read ({err}); the checkpoint is damaged") from None
    except ValidationError as err:
        errors = err.errors()
        if errors[0]["type"] == "json_invalid":
            raise ConfigError(f"{file}: not valid JSON ({errors[0]['msg']}); the checkpoint is damaged") from None
        raise ConfigError(
            f"{path}: not a checkpoint of this clt-pipeline's architecture "
            f"({format_validation_error(err, 'config.json')})"
        ) from None


def load_model(
    path: str | Path, shards: FeatureShards | None = None, device: str | torch.device = "cpu"
) -> CrossLayerTranscoder:
    """A trained CLT from a checkpoint directory, optionally as one feature shard of it."""
    path = Path(path)
    model = CrossLayerTranscoder(read_config(path), shards)
    load_weights(path, model)
    return model.to(device)


def load_weights(path: Path, model: CrossLayerTranscoder) -> None:
    full = read_tensors(path / "model.safetensors")
    params = dict(model.named_parameters())
    if set(full) != set(params):
        raise ConfigError(f"{path}: model.safetensors holds {sorted(full)}, the model has {sorted(params)}")
    for name, param in params.items():  # whole shapes first: slicing a smaller tensor would fail obscurely
        dim, expected = feature_dim(name), list(param.shape)
        if dim is not None:
            expected[dim] = model.config.num_features
        if list(full[name].shape) != expected:
            raise ConfigError(
                f"{path}: model.safetensors holds {name} of shape {tuple(full[name].shape)}, but config.json "
                f"describes {tuple(expected)}: the weights and config.json are of different models"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(local_slice(model, name, full[name]))


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
