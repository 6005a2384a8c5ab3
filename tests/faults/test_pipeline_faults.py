"""Faults in the orchestrated pipeline: a run that fails in one stage registers nothing and moves no alias; the re-run
continues from the failed stage (everything before it cached) and registers exactly one version."""

from __future__ import annotations

import os
from pathlib import Path

from mlflow import MlflowClient
from pipelines import pipeline_config, task_states

from flows.config import PipelineConfig
from flows.pipeline import clt_pipeline, tracking_uri


def test_a_failed_stage_is_resumed_by_the_rerun_and_registers_once(
    prefect_harness: None, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    good = pipeline_config(tiny_dirs["llama"], tmp_path / "work")
    broken = PipelineConfig.from_dict({**good.model_dump(mode="json"), "convert": {"fit_rows": 10**7}})
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    state = clt_pipeline(broken, return_state=True)
    assert state.is_failed()
    states = task_states(state.state_details.flow_run_id)
    assert states["convert"] == ["Failed"] and "register" not in states and "evaluate" not in states
    # The run's tracking URI does not leak into the process: an earlier run's store would take this run's versions.
    assert {k: os.environ.get(k) for k in env_before} == env_before
    client = MlflowClient(tracking_uri(good))
    assert client.search_model_versions("name='clt'") == []  # nothing registered, no alias moved

    state = clt_pipeline(good, return_state=True)
    assert state.is_completed()
    states = task_states(state.state_details.flow_run_id)
    for name in ("extract-shard", "norm-stats", "scramble", "train"):
        assert set(states[name]) == {"Cached"}, (name, states[name])
    assert states["convert"] == ["Completed"] and states["register"] == ["Completed"]
    versions = client.search_model_versions("name='clt'")
    assert len(versions) == 1 and client.get_model_version_by_alias("clt", "champion").version == versions[0].version
