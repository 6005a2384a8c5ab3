"""The pipeline's one typed config: a section per stage, each the stage's own `clt_core` config."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field

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
    """extract → norm stats → scramble → train → convert → evaluate → export → register."""

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


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (configs, upstream fingerprints): names a stage's output."""
    blob = json.dumps([p.model_dump(mode="json") if isinstance(p, Config) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
