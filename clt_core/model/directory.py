"""The model directory: what training's `final/`, every step checkpoint and `clt convert` write, and what convert,
evaluate, export, the registry and the CLI load (`load`).

Files, all unsharded (a model saved from N feature shards loads as any other number) and none pickled:
- `config.json`: the CLTConfig (`decoders` among it: a directory written before that setting existed holds a
  cross-layer transcoder, and loads as one);
- `model.safetensors`: the parameters `W_enc [L,F,d]`, `b_enc [L,F]`, `W_dec.{s} [F,T_s,d]` (T_s = L-s targets for a
  cross-layer transcoder, 1 for a per-layer one), `b_dec [L,d]` and, for jumprelu, `log_threshold [L,F]`;
- `normalization.safetensors`: the `[L,d]` mean and std the model's inputs and targets were standardised with
  (absent when training used none), so the model maps raw MLP inputs to raw MLP outputs;
- `source.json`: the training data (`{"data": store URL, "store": the store's metadata}`: the language model, its
  hook templates, context size).
A step checkpoint adds the training state beside them (train/checkpoint.py). Directories are written to a temporary
sibling and renamed into place (`write_atomically`), so a model directory is either complete or absent.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clt_core.config import format_validation_error
from clt_core.data.sampler import Normalizer, SamplerConfig, held_out_range
from clt_core.data.store import ActivationStore
from clt_core.errors import CLTError, ConfigError
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.parallel import FeatureShards

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NORMALIZATION_FILE = "normalization.safetensors"
SOURCE_FILE = "source.json"

log = logging.getLogger(__name__)
DEFAULT_HOLDOUT_FRACTION = 0.05
"""The held-out share evaluated on for a model that trained on every row of its store (those rows are not held out)."""


class TrainedModel(NamedTuple):
    """A model directory, loaded."""

    model: CrossLayerTranscoder
    """In eval mode, on the device asked for."""
    normalizer: Normalizer | None
    """The normalisation of the model's inputs and targets (None: it saw raw activations)."""
    source: dict[str, Any]
    """`source.json` ({} if absent)."""
    path: Path

    @property
    def data_url(self) -> str | None:
        """The store the model was trained on, if known."""
        return self.source.get("data")

    @property
    def store_info(self) -> dict[str, Any]:
        """That store's metadata (language model, hook templates, context size); {} if unknown."""
        return self.source.get("store", {})

    @property
    def sampler(self) -> SamplerConfig:
        """How training drew its batches (held-out split, dtype, `nonfinite`); the defaults where not recorded (fields
        this version does not know are ignored)."""
        recorded = self.source.get("sampler") or {}
        return SamplerConfig.model_validate({k: v for k, v in recorded.items() if k in SamplerConfig.model_fields})

    def held_out_rows(self, store: ActivationStore, holdout_fraction: float | None = None) -> tuple[int, int, float]:
        """Rows [start, stop) of `store` the model did not train on, and the share of its chunks they are: with
        `holdout_fraction`, that share's tail; all of a live run's own held-out store (`OUT/held_out`, share 1);
        else the tail of the split it trained with (`DEFAULT_HOLDOUT_FRACTION` where it kept none: not held out)."""
        if holdout_fraction is None and "live" in self.source and store.url == self.data_url:
            return 0, store.num_rows, 1.0
        fraction = holdout_fraction
        if fraction is None:
            sampler = self.source.get("sampler")
            train_config = self.path.parent / "train_config.yaml"
            if sampler is None and train_config.exists():  # model directories written before source.json said it
                sampler = (yaml.safe_load(train_config.read_text()) or {}).get("sampler")
            fraction = (sampler or {}).get("holdout_fraction")
            if not fraction:
                log.warning(
                    "%s was trained on every row of its store: the rows evaluated on are not held out", self.path
                )
                fraction = DEFAULT_HOLDOUT_FRACTION
        start, stop = held_out_range(store, float(fraction))
        return start, stop, float(fraction)


def load(path: str | Path, *, device: str | torch.device = "cpu", shards: FeatureShards | None = None) -> TrainedModel:
    """A model directory: the CLT (optionally one feature shard of it) with its normalisation and source; one line
    of error when a file is missing, damaged or of another model."""
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):  # no random initialisation for weights the file overwrites (6.4 s at F=2048, L=30)
        model = CrossLayerTranscoder(config, shards)
    model = model.to_empty(device="cpu")
    load_weights(path, model)
    return TrainedModel(model.to(device).eval(), read_normalizer(path), read_source(path), path)


def save(
    path: str | Path,
    model: CrossLayerTranscoder,
    normalizer: Normalizer | None = None,
    source: dict[str, Any] | None = None,
) -> None:
    """Write a model directory at `path` (collective: every feature shard calls it, rank 0 writes)."""
    weights = full_state(model)
    if model.shards.rank == 0:
        write_atomically(Path(path), lambda tmp: write_model(tmp, model.config, weights, normalizer, source))


def write_model(
    path: Path,
    config: CLTConfig,
    weights: dict[str, torch.Tensor],
    normalizer: Normalizer | None,
    source: dict[str, Any] | None,
) -> None:
    """The model's files into the existing directory `path` (`weights`: full parameters, as `full_state` gives)."""
    (path / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    save_file(weights, str(path / WEIGHTS_FILE))
    if normalizer is not None:
        save_file({k: v.contiguous() for k, v in normalizer.state_dict().items()}, str(path / NORMALIZATION_FILE))
    if source is not None:
        (path / SOURCE_FILE).write_text(json.dumps(source, indent=2))


def write_atomically(path: Path, fill: Callable[[Path], None]) -> None:
    """Make the directory `path` by `fill`ing a temporary sibling, then renaming it over `path`: a crash leaves the
    earlier `path` as it was. A full disk is one line that says how to go on."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
            raise CLTError(
                f"{path}: no space left on device while writing it; free space, or move the run to a bigger disk, "
                "and continue it with --resume"
            ) from None
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


# -- feature shards ----------------------------------------------------------------------------------------------------


def feature_dim(name: str) -> int | None:
    """The dimension along which a parameter is split over feature shards (None: replicated)."""
    if name.startswith("W_dec."):
        return 0
    return None if name == "b_dec" else 1


def gather_full(model: CrossLayerTranscoder, name: str, local: torch.Tensor) -> torch.Tensor:
    """The whole of parameter `name` (or a tensor shaped like it) from every shard's `local` part (collective)."""
    dim = feature_dim(name)
    return local if dim is None else model.shards.all_gather_cat(local.detach(), dim=dim)


def local_slice(model: CrossLayerTranscoder, name: str, full: torch.Tensor) -> torch.Tensor:
    """This shard's part of the whole of parameter `name`."""
    dim = feature_dim(name)
    if dim is None:
        return full
    lo, hi = model.feature_range
    return full.narrow(dim, lo, hi - lo)


def full_state(model: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters, on the CPU; every rank must call it (it gathers)."""
    return {n: gather_full(model, n, p).cpu().contiguous() for n, p in model.named_parameters()}


# -- reading -----------------------------------------------------------------------------------------------------------


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or one line saying it is missing or damaged (safetensors never runs code from a file,
    unlike a pickle, so a forged file can only fail to parse)."""
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise ConfigError(f"{file} is missing: the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{file} is not a valid safetensors file ({err}); the checkpoint is damaged") from None


def read_normalizer(path: str | Path) -> Normalizer | None:
    """The normalisation a model was trained behind (None: it saw raw activations)."""
    file = Path(path) / NORMALIZATION_FILE
    return Normalizer.from_state_dict(read_tensors(file)) if file.exists() else None


def read_source(path: str | Path) -> dict[str, Any]:
    """`{"data": store URL, "store": the store's metadata}` of the model's training data ({} if unknown)."""
    file = Path(path) / SOURCE_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def read_config(path: str | Path) -> CLTConfig:
    """A model directory's CLTConfig; one line when it is missing, not JSON, or of another architecture."""
    file = Path(path) / CONFIG_FILE
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


def load_weights(path: Path, model: CrossLayerTranscoder) -> None:
    """`model.safetensors` into `model` (this shard's slice), after checking every shape against the config."""
    full = read_tensors(path / WEIGHTS_FILE)
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
