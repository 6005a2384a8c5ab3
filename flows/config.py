"""The pipeline's one typed config: a section per stage, each the stage's own `clt_core` config."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, model_validator

from clt_core.config import Config
from clt_core.convert import ConvertConfig
from clt_core.data.sampler import SamplerConfig
from clt_core.data.scramble import ScrambleConfig
from clt_core.evaluate import EvaluateConfig
from clt_core.extract.extractor import ExtractConfig
from clt_core.train.config import TrainConfig


class RegistrySettings(Config):
    """Where runs are tracked and the converted model is registered."""

    model_name: str = "clt"
    """Registered model name in MLflow."""
    metric: str = "mean_nmse"
    """Metric the champion gate compares (`ce_recovered` needs the spliced-in evaluation)."""
    higher_is_better: bool = False
    l0_slack: float = Field(0.1, ge=0)
    """An NMSE only counts at matched L0: the challenger's L0 may exceed the champion's by this fraction."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default: `MLFLOW_TRACKING_URI`, else SQLite in the work directory."""
    experiment: str = "clt-pipeline"


class PipelineConfig(Config):
    """extract → norm stats → scramble → train → convert → evaluate → export → register; or, with `source: live`,
    train straight from the language model → convert → evaluate → export → register."""

    source: Literal["store", "live"] = "store"
    """`store`: extract a store, scramble it and train on it (each stage cached on its inputs); `live`: train from the
    language model as it runs (`train.live`: model, text, tokens), no store but the held-out rows training extracts
    into its run directory, which conversion and evaluation then use. Training is cached on `train` (the live
    model's name, not its weights: a changed file behind the same path is not noticed; `--refresh` re-runs)."""
    work_dir: str = "pipeline-output"
    """Local directory for training runs, models and exports; stores go here too unless `store_root` is set."""
    store_root: str | None = None
    """Where activation stores go: a local path or `s3://bucket/prefix` (default: WORK_DIR/stores)."""
    extract: ExtractConfig = ExtractConfig(tokens=32768)
    extract_shards: int = Field(1, ge=1)
    """Extraction tasks that fill one store in parallel (`clt extract --shard i/n` each)."""
    scramble: ScrambleConfig = ScrambleConfig(memory_budget=512 * 2**20)
    train: TrainConfig = TrainConfig(sampler=SamplerConfig(holdout_fraction=0.1))
    """`data` and `output_dir` are set by the pipeline."""
    nproc: int = Field(1, ge=1)
    """Feature shards: training runs under `torchrun --nproc_per_node NPROC`."""
    convert: ConvertConfig = ConvertConfig()
    evaluate: EvaluateConfig = EvaluateConfig(spliced=True)
    """`data` and `model` default to the trained model's own store and language model."""
    registry: RegistrySettings = RegistrySettings()

    @model_validator(mode="after")
    def _source_matches_training(self) -> PipelineConfig:
        if self.source == "live" and self.train.live is None:
            raise ValueError("source: live needs train.live (at least model, text and tokens)")
        if self.source == "store" and self.train.live is not None:
            raise ValueError("train.live is set but source is store; set source: live to train from the model")
        if self.source == "live" and not self.train.live.held_out_tokens:  # type: ignore[union-attr]
            raise ValueError("source: live needs train.live.held_out_tokens > 0: conversion and evaluation use them")
        return self


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (configs, upstream fingerprints): names a stage's output."""
    blob = json.dumps([p.model_dump(mode="json") if isinstance(p, Config) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
