"""The `clt-pipeline` flow: extract (mapped over shards) → norm stats → scramble → train (torchrun) → convert →
evaluate → export → register, each a cached task; MLflow tracks the whole run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped

from flows import tasks
from flows.config import PipelineConfig, fingerprint


def _tracking_uri(config: PipelineConfig) -> str:
    if config.registry.tracking_uri:
        return config.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(config.work_dir).resolve() / 'mlflow.db'}"


@flow(name="clt-pipeline", log_prints=True)
def clt_pipeline(config: PipelineConfig | None = None, config_file: str | None = None, refresh: bool = False) -> dict:
    """Run every stage; a stage whose inputs are unchanged since an earlier run is skipped (`refresh` re-runs all)."""
    if config_file:
        config = PipelineConfig.from_yaml(config_file)
    config = config or PipelineConfig()
    logger = get_run_logger()
    work = Path(config.work_dir).resolve()
    stores = (config.store_root or str(work / "stores")).rstrip("/")
    opts: dict[str, Any] = {"refresh_cache": True} if refresh else {}

    def run(task: Any) -> Any:
        return task.with_options(**opts) if opts else task

    acts_url = f"{stores}/acts-{fingerprint(config.extract, config.extract_shards)}"
    n = config.extract_shards
    shards = run(tasks.extract_shard).map(unmapped(acts_url), unmapped(config.extract), range(n), unmapped(n)).result()
    acts = run(tasks.norm_stats)(acts_url, shards)
    scrambled = run(tasks.scramble)(acts, f"{stores}/scrambled-{fingerprint(acts['fingerprint'], config.scramble)}",
                                    config.scramble)  # fmt: skip
    run_dir = work / "runs" / f"train-{fingerprint(scrambled['fingerprint'], config.train, config.nproc)}"
    trained = run(tasks.train)(scrambled, config.train, str(run_dir), config.nproc)
    converted = run(tasks.convert)(trained, config.convert, str(run_dir / f"jumprelu-{fingerprint(config.convert)}"))
    summary = {"store": acts["url"], "scrambled": scrambled["url"], "trained": trained["url"],
               "converted": converted["url"], "metrics": converted["metrics"]}  # fmt: skip
    logger.info(f"pipeline done: {summary}")
    return summary
