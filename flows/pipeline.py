"""The `clt-pipeline` flow: extract (mapped over shards) → norm stats → scramble → train (torchrun) → convert →
evaluate → export → register, each a cached task; one MLflow run tracks the whole pipeline run.

`python -m flows.pipeline --config pipeline.yaml [--refresh]` runs it here (Prefect's ephemeral mode when no
`PREFECT_API_URL` is set); deployments run the same flow on a worker.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.filesystems import LocalFileSystem

from flows import registry, tasks
from flows.config import PipelineConfig, fingerprint


def tracking_uri(config: PipelineConfig) -> str:
    if config.registry.tracking_uri:
        return config.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(config.work_dir).resolve() / 'mlflow.db'}"


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@flow(name="clt-pipeline", log_prints=True)
def clt_pipeline(config: PipelineConfig | None = None, config_file: str | None = None, refresh: bool = False) -> dict:
    """Run every stage; a stage whose inputs are unchanged since an earlier run is skipped (`refresh` re-runs all)."""
    import mlflow

    from clt_core.tracking import flatten_params

    if config_file:
        config = PipelineConfig.from_yaml(config_file)
    config = config or PipelineConfig()
    logger = get_run_logger()
    work = Path(config.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stores = (config.store_root or str(work / "stores")).rstrip("/")
    # Cache records and results live beside the outputs they describe: deleting the work directory forgets both.
    storage = LocalFileSystem(basepath=str(work / ".prefect-results"))
    storage.save(f"clt-results-{fingerprint(str(work))}", overwrite=True)  # Prefect refers to result storage by name
    opts: dict[str, Any] = {"result_storage": storage}
    if refresh:
        opts["refresh_cache"] = True

    def run(task: Any) -> Any:
        return task.with_options(**opts)

    with (
        registry.tracking(tracking_uri(config)),
        mlflow.start_run(experiment_id=registry.experiment_id(config.registry.experiment)) as mlflow_run,
    ):
        run_id = mlflow_run.info.run_id
        mlflow.log_params(flatten_params(config.model_dump(mode="json")))
        if config.source == "store":
            acts_url = f"{stores}/acts-{fingerprint(config.extract, config.extract_shards)}"
            n = config.extract_shards
            shards = run(tasks.extract_shard).map(unmapped(acts_url), unmapped(config.extract), range(n), unmapped(n))
            acts = run(tasks.norm_stats)(acts_url, shards.result())
            scrambled_url = f"{stores}/scrambled-{fingerprint(acts['fingerprint'], config.scramble)}"
            data = run(tasks.scramble)(acts, scrambled_url, config.scramble)
        else:  # the model itself: training is keyed on its config alone
            assert config.train.live is not None
            data = {"url": f"live:{config.train.live.model}", "fingerprint": fingerprint(config.train.live)}
        run_dir = work / "runs" / f"train-{fingerprint(data['fingerprint'], config.train, config.nproc)}"
        trained = run(tasks.train)(data, config.train, str(run_dir), config.nproc, run_id)
        if config.source == "live":  # the held-out rows training extracted stand for the store downstream
            held = trained.pop("held_out")
            data = acts = tasks.store_stage(held)
        trained_in = trained.pop("mlflow_run_id", None)  # not downstream: no part of a later stage's cache key
        if trained_in not in (None, run_id):  # training cached: its params and metrics are in the run that trained
            mlflow.set_tag("train_run_id", trained_in)
        tag = fingerprint(config.convert)
        converted = run(tasks.convert)(trained, config.convert, str(run_dir / f"jumprelu-{tag}"))
        evaluated = run(tasks.evaluate)(converted, config.evaluate, str(run_dir / f"evaluation-{tag}"))
        exported = run(tasks.export)(converted, str(run_dir / f"circuit-tracer-{tag}"))
        lineage = {
            "store": acts["url"], "store_fingerprint": acts["fingerprint"], "scrambled": data["url"],
            "scrambled_fingerprint": data["fingerprint"], "checkpoint": trained["url"],
            "checkpoint_fingerprint": trained["fingerprint"], "model_dir": converted["url"],
            "code_version": _code_version(),
        }  # fmt: skip
        if config.source == "live":
            lineage |= {"source": "live", "live_model": config.train.live.model}  # type: ignore[union-attr]
            del lineage["scrambled"], lineage["scrambled_fingerprint"]
        mlflow.set_tags(lineage)
        registered = run(tasks.register)(converted, exported, evaluated, config.registry, run_id, lineage)
        experiment_id = mlflow_run.info.experiment_id
    _summary_artifact(config, acts, trained, converted, evaluated, registered, run_id, experiment_id)
    summary = {**lineage, "mlflow_run_id": run_id, "registered": registered, "metrics": evaluated["metrics"],
               "export": exported["url"]}  # fmt: skip
    logger.info(f"pipeline done: {summary}")
    return summary


def _summary_artifact(config: PipelineConfig, acts: dict, trained: dict, converted: dict, evaluated: dict,
                      registered: dict, run_id: str, experiment_id: str) -> None:  # fmt: skip
    """A markdown summary of the run in Prefect's UI: each stage's output, per-layer metrics, the MLflow run."""
    from prefect.artifacts import create_markdown_artifact

    uri = tracking_uri(config)
    link = f"{uri}/#/experiments/{experiment_id}/runs/{run_id}" if uri.startswith("http") else f"{uri} run {run_id}"
    report = converted.get("report", {})
    rows = "\n".join(
        f"| {layer} | {nmse:.4f} | {l0:.1f} |"
        for layer, (nmse, l0) in enumerate(zip(report.get("calibrated", report.get("final", {})).get("nmse", []),
                                               report.get("calibrated", report.get("final", {})).get("l0", []),
                                               strict=True))
    )  # fmt: skip
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in evaluated["metrics"].items())
    first_stage = "held-out rows (live)" if config.source == "live" else "extract + norm stats"
    markdown = f"""# clt-pipeline run

| stage | output |
|---|---|
| {first_stage} | `{acts["url"]}` ({acts["rows"]:,} rows) |
| train | `{trained["url"]}` |
| convert | `{converted["url"]}` (estimator {report.get("estimator", "?")}) |
| register | {registered["name"]} v{registered["version"]}: {registered["reason"]} |

MLflow: {link}

## Evaluation
| metric | value |
|---|---|
{metrics}

## Converted model per layer (held-out)
| layer | NMSE | L0 |
|---|---|---|
{rows}
"""
    create_markdown_artifact(markdown=markdown, key="clt-pipeline-summary", description="stages, metrics, MLflow run")


def describe(summary: dict[str, Any], config: PipelineConfig) -> str:
    reg, m = summary["registered"], summary["metrics"]
    alias = "champion" if reg["promoted"] else "not promoted"
    lines = [
        f"registered {reg['name']} version {reg['version']} ({alias}: {reg['reason']})",
        f"held-out NMSE {m['mean_nmse']:.4f}, EV {m['mean_explained_variance']:.4f}, L0 {m['total_l0']:.1f}"
        + (f"; CE recovered {m['ce_recovered']:.3f}, KL {m['kl_per_token']:.3f}/token" if "ce_recovered" in m else ""),
        f"circuit-tracer files: {summary['export']}",
        f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri(config)}",
        "Prefect UI: .venv/bin/prefect server start   (then http://127.0.0.1:4200)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline YAML (default: the built-in defaults)")
    parser.add_argument("--refresh", action="store_true", help="re-run every stage, cached or not")
    args = parser.parse_args(argv)
    config = PipelineConfig.from_yaml(args.config) if args.config else PipelineConfig()
    summary = clt_pipeline(config, refresh=args.refresh)
    print(describe(summary, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
