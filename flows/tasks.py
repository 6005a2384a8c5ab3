"""Thin Prefect tasks over the `clt_core` stages. Each takes its config section and the upstream stage's output
(a URL and a fingerprint) and returns its own; no tensors pass between tasks, and nothing here does math.

Caching: `INPUTS + TASK_SOURCE`, results persisted as JSON, so a re-run (also from a new process) skips a stage
whose config section and upstream fingerprints are unchanged. Outputs live at paths named by those fingerprints,
so a changed config writes beside the old output, and a re-run after a crash resumes in place (extraction from its
last committed chunk, training from its last checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from pathlib import Path
from typing import Any, TypedDict

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from clt_core.convert import ConvertConfig
from clt_core.data.scramble import ScrambleConfig
from clt_core.data.shards import Shard
from clt_core.data.store import ActivationStore, store_exists
from clt_core.evaluate import EvaluateConfig
from clt_core.extract.extractor import ExtractConfig
from clt_core.train.config import TrainConfig
from clt_core.train.launch import torchrun_command
from flows.config import RegistrySettings, fingerprint


class Caching(TypedDict):
    """The `@task` arguments of a cached stage."""

    cache_policy: CachePolicy
    persist_result: bool
    result_serializer: str


class Retrying(TypedDict):
    """The `@task` arguments of a retried stage."""

    retries: int
    retry_delay_seconds: list[float]
    retry_jitter_factor: float


CACHED = Caching(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, result_serializer="json")
PROGRESS_SECONDS = 10.0
"""How often the training subprocess writes a progress line into the run log."""
RETRIES = Retrying(retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
"""Transient storage and network errors: two retries with backoff (stages resume, so a retry loses no work)."""

Stage = dict[str, Any]
"""`{"url": ..., "fingerprint": ..., **summary}`: what a stage hands downstream."""


def _store_fingerprint(url: str) -> str:
    store = ActivationStore.open(url)
    info = store.info.model_dump(mode="json")
    return fingerprint(url, info.get("created_at"), store.num_rows, info.get("model"))


def store_stage(url: str) -> Stage:
    """A finished store as a stage's output."""
    return {"url": url, "fingerprint": _store_fingerprint(url), "rows": ActivationStore.open(url).num_rows}


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@task(name="extract-shard", **CACHED, **RETRIES)
def extract_shard(url: str, config: ExtractConfig, index: int, count: int) -> Stage:
    from clt_core.extract.extractor import extract

    summary = extract(url, config, shard=Shard(index, count), progress=False)
    get_run_logger().info(str(summary))
    return {"url": url, "shard": index, "rows_this_run": summary.rows_this_run}


@task(name="norm-stats", **CACHED, **RETRIES)
def norm_stats(url: str, shards: list[Stage]) -> Stage:
    """The shards' merged moments are committed by the last shard; recompute only when a store lacks them."""
    from clt_core.data.norm_stats import compute_norm_stats

    store = ActivationStore.open(url)
    if store.read_norm_stats() is None:
        compute_norm_stats(ActivationStore.open(url, mode="a"), progress=False)
    stage = store_stage(url)
    get_run_logger().info(f"{url}: {stage['rows']:,} rows with norm stats")
    return stage


@task(name="scramble", **CACHED, **RETRIES)
def scramble(source: Stage, dst: str, config: ScrambleConfig) -> Stage:
    from clt_core.data.scramble import scramble_store

    if not (store_exists(dst) and ActivationStore.open(dst).info.scrambled):
        get_run_logger().info(str(scramble_store(source["url"], dst, config, overwrite=True, progress=False)))
    return store_stage(dst)


@task(name="train", **(CACHED | {"cache_policy": (INPUTS - "mlflow_run_id") + TASK_SOURCE}))
def train(data: Stage, config: TrainConfig, out_dir: str, nproc: int, mlflow_run_id: str | None = None) -> Stage:
    """`clt train` under torchrun as a subprocess, its progress lines streamed into the run log; `--resume` continues
    a crashed run from its newest checkpoint. With `mlflow_run_id` (not part of the cache key) the trainer logs its
    params, per-step metrics and plot into that run, under `train/` (MLflow's own `MLFLOW_RUN_ID` and
    `MLFLOW_TRACKING_URI`, in the subprocess's environment only); the result names the run that holds them."""
    import mlflow

    logger = get_run_logger()
    update: dict[str, Any] = {"output_dir": out_dir}
    if config.live is None:  # a live run reads no store
        update["data"] = data["url"]
    config = config.model_copy(update=update)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    config_file = Path(out_dir) / "pipeline_train.yaml"
    config_file.write_text(config.to_yaml())
    final = Path(out_dir) / "final"
    trained_in = None
    if not final.exists():
        args = ["train", "--config", str(config_file), "--resume", "--quiet", "--progress-every", str(PROGRESS_SECONDS)]
        command, env = torchrun_command(args, nproc)
        env.pop("MLFLOW_RUN_ID", None)
        if mlflow_run_id is not None:
            env.update(MLFLOW_RUN_ID=mlflow_run_id, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
            trained_in = mlflow_run_id
        logger.info(" ".join(command))
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                logger.info(line.rstrip())
        if proc.returncode != 0:
            raise RuntimeError(f"training exited with status {proc.returncode}; see the log above")
    held_out = Path(out_dir) / "held_out"
    return {"url": str(final), "fingerprint": _file_hash(final / "model.safetensors"), "mlflow_run_id": trained_in,
            **({"held_out": str(held_out.absolute())} if config.live is not None else {})}  # fmt: skip


@task(name="convert", **CACHED)
def convert(trained: Stage, config: ConvertConfig, out_dir: str) -> Stage:
    from clt_core.convert import convert as convert_model
    from clt_core.convert import describe

    report = convert_model(trained["url"], out_dir, config, overwrite=True, progress=False)
    get_run_logger().info(describe(report))
    return {"url": out_dir, "fingerprint": _file_hash(Path(out_dir) / "model.safetensors"), "report": report}


@task(name="evaluate", **CACHED)
def evaluate(converted: Stage, config: EvaluateConfig, out_dir: str) -> Stage:
    from clt_core.evaluate import describe
    from clt_core.evaluate import evaluate as evaluate_model

    report = evaluate_model(converted["url"], out_dir, config, progress=False)
    get_run_logger().info(describe(report))
    rec = report["reconstruction"]
    metrics = {k: rec[k] for k in ("mean_nmse", "total_l0", "dead_fraction", "dense_fraction")}
    metrics["mean_explained_variance"] = sum(rec["explained_variance"]) / len(rec["explained_variance"])
    if "spliced" in report:
        spliced = report["spliced"]
        metrics.update({k: spliced[k] for k in ("ce_original", "ce_spliced", "ce_zero_ablation", "ce_recovered",
                                                "kl_per_token", "top1_agreement")})  # fmt: skip
    return {"url": out_dir, "fingerprint": converted["fingerprint"], "metrics": metrics, "plots": report["plots"]}


@task(name="export", **CACHED)
def export(converted: Stage, out_dir: str) -> Stage:
    from clt_core.export import export_circuit_tracer

    export_circuit_tracer(converted["url"], out_dir, overwrite=True)
    return {"url": out_dir, "fingerprint": converted["fingerprint"]}


@task(name="register", **RETRIES)
def register(converted: Stage, exported: Stage, evaluated: Stage, settings: RegistrySettings, run_id: str,
             lineage: dict[str, str]) -> Stage:  # fmt: skip
    """Log the evaluation into the pipeline's MLflow run and register the model; the champion gate decides."""
    import mlflow

    from flows.registry import Gate, register_model

    gate = Gate(settings.metric, settings.higher_is_better, settings.l0_slack)
    active = mlflow.active_run()
    with contextlib.nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"eval/{k}": v for k, v in evaluated["metrics"].items()})
        for plot in evaluated["plots"]:
            mlflow.log_artifact(plot, artifact_path="plots")
        result = register_model(converted["url"], exported["url"], settings.model_name, evaluated["metrics"], gate,
                                tags=lineage, fingerprint=converted["fingerprint"])  # fmt: skip
    get_run_logger().info(
        f"{settings.model_name} version {result['version']}: {'promoted to' if result['promoted'] else 'not'} "
        f"champion ({result['reason']})"
    )
    return result
