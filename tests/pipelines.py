"""Shared by the pipeline tests: a tiny pipeline config and readers of what Prefect recorded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flows.config import PipelineConfig
from flows.pipeline import clt_pipeline

STAGES = ["extract-shard", "norm-stats", "scramble", "train", "convert", "evaluate", "export", "register"]


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


def summary_artifact(flow_run_id) -> str:
    """The `clt-pipeline-summary` markdown artifact of that flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["clt-pipeline-summary"]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                )
            )

    (artifact,) = asyncio.run(read())
    return artifact.data


def run_pipeline(config: PipelineConfig) -> tuple[dict, dict[str, list[str]], str]:
    """Run the flow; its result, its task states and its flow run id."""
    state = clt_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    return state.result(), task_states(flow_run_id), flow_run_id
