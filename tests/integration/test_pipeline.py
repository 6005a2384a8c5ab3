"""The clt-pipeline flow for real (Prefect test harness, MLflow on SQLite) on a tiny model: every stage runs, a
second run is fully cached, a changed training setting re-runs training and what follows it only."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.config import PipelineConfig
from flows.pipeline import clt_pipeline, tracking_uri

STAGES = ["extract-shard", "norm-stats", "scramble", "train", "convert", "evaluate", "export", "register"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def pipeline_config(model: Path, work: Path, **train: object) -> PipelineConfig:
    return PipelineConfig.from_dict({
        "work_dir": str(work),
        "extract": {"model": str(model), "text": {"source": "packaged:kjv", "max_documents": 200}, "tokens": 4096,
                    "context_size": 64, "batch_size": 8, "compute_dtype": "float32", "chunk_rows": 128},
        "extract_shards": 2,
        "train": {"model": {"num_features": 64, "activation_fn": "batchtopk", "k": 4},
                  "sampler": {"batch_size": 256, "holdout_fraction": 0.25}, "training_steps": 20, "log_interval": 10,
                  "eval_interval": 20, "checkpoint_interval": 10, "eval_rows": 512, **train},
        "convert": {"batches": 2},
        "evaluate": {"max_rows": 512, "tokens": 128, "text": "packaged:kjv", "text_batch_size": 4},
    })  # fmt: skip


def task_states(flow_run_id) -> dict[str, list[str]]:
    """Task name (without its run suffix) -> the state names of its runs in that flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    states: dict[str, list[str]] = {}
    for run in asyncio.run(read()):
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def summary_artifact() -> str:
    """The newest `clt-pipeline-summary` markdown artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["clt-pipeline-summary"]))
            )

    return asyncio.run(read())[-1].data


def run_pipeline(config: PipelineConfig) -> tuple[dict, dict[str, list[str]]]:
    state = clt_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    return state.result(), task_states(state.state_details.flow_run_id)


def test_stages_run_then_cache_then_rerun_from_training(harness, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = pipeline_config(tiny_dirs["llama"], tmp_path / "work")
    first, states = run_pipeline(config)
    assert sorted(states) == sorted(STAGES)
    assert all(s == ["Completed"] * len(s) for s in states.values()), states
    assert len(states["extract-shard"]) == 2
    assert first["registered"]["promoted"] and first["registered"]["version"] == "1"
    assert Path(first["export"], "W_enc_0.safetensors").exists()
    assert "| mean_nmse |" in summary_artifact() and first["mlflow_run_id"] in summary_artifact()

    second, states = run_pipeline(config)
    assert {name: set(s) for name, s in states.items() if name != "register"} == {
        name: {"Cached"} for name in STAGES if name != "register"
    }
    assert second["registered"]["reused"] and second["registered"]["version"] == "1"  # no duplicate version

    changed = pipeline_config(tiny_dirs["llama"], tmp_path / "work", training_steps=30)
    third, states = run_pipeline(changed)
    for name in ("extract-shard", "norm-stats", "scramble"):
        assert set(states[name]) == {"Cached"}, (name, states[name])
    for name in ("train", "convert", "evaluate", "export", "register"):
        assert states[name] == ["Completed"], (name, states[name])
    assert third["checkpoint"] != first["checkpoint"] and third["registered"]["version"] == "2"

    client = MlflowClient(tracking_uri(config))
    versions = client.search_model_versions("name='clt'")
    assert len(versions) == 2 and all(v.tags["promotion_reason"] for v in versions)
    run = client.get_run(third["mlflow_run_id"])
    assert run.data.params["train.training_steps"] == "30" and "eval/mean_nmse" in run.data.metrics
    assert run.data.tags["store"] == first["store"]
    assert len(client.get_metric_history(run.info.run_id, "train/loss/total")) >= 3

    # The registry from the command line: list the versions, fetch the champion's circuit-tracer files.
    from clt_core.cli import main

    uri = tracking_uri(config)
    assert main(["models", "list", "--tracking-uri", uri]) == 0
    assert main(["models", "get", "clt@champion", "--out", str(tmp_path / "got"), "--tracking-uri", uri]) == 0
    assert (tmp_path / "got" / "W_dec_0.safetensors").exists() and (
        tmp_path / "got" / "native" / "config.json"
    ).exists()
    assert main(["models", "get", "missing@champion", "--out", str(tmp_path / "x"), "--tracking-uri", uri]) == 2
