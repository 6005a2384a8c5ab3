"""No secret leaves the environment: a pipeline run on S3 is scanned, everywhere it writes, for the S3 secret key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pipelines import pipeline_config

from flows.config import PipelineConfig
from flows.pipeline import clt_pipeline, tracking_uri

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def _prefect_records(flow_run_id) -> list[str]:
    """The flow run's parameters, every log line of it and its tasks, and every artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> list[str]:
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            artifacts = await client.read_artifacts()
            return [json.dumps(run.parameters, default=str), *(log.message for log in logs),
                    *(json.dumps(a.data, default=str) for a in artifacts)]  # fmt: skip

    return asyncio.run(read())


def _mlflow_records(uri: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    records = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            records += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(run.data.metrics)]
    for version in client.search_model_versions():
        records += [json.dumps(version.tags), version.source or "", version.description or ""]
    return records


def _files(root: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]


def test_the_s3_secret_appears_in_no_log_param_tag_artifact_or_file(
    prefect_harness: None, s3_env, tiny_dirs: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from clt_core.data.storage import filesystem, parse_url

    secret = s3_env.secret_key
    base = pipeline_config(tiny_dirs["llama"], tmp_path / "work")
    config = PipelineConfig.from_dict({**base.model_dump(mode="json"), "store_root": "s3://acts/secrets-scan"})
    state = clt_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    out, err = capfd.readouterr()

    places = {"stdout/stderr": [out, err], "prefect": _prefect_records(state.state_details.flow_run_id),
              "mlflow": _mlflow_records(tracking_uri(config))}  # fmt: skip
    leaks = [where for where, texts in places.items() if any(secret in text for text in texts)]
    leaks += [name for name, data in _files(tmp_path) if secret.encode() in data]  # configs, metrics, models, mlflow
    fs = filesystem(parse_url("s3://acts/secrets-scan"))
    leaks += [key for key in fs.find("acts/secrets-scan") if secret.encode() in fs.cat_file(key)]  # store metadata
    assert places["prefect"] and places["mlflow"] and fs.find("acts/secrets-scan")  # the scan saw something
    assert not leaks, f"the S3 secret leaked into {leaks}"
