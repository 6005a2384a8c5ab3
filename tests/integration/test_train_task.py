"""The pipeline's train task in a real Prefect flow run (test harness) with MLflow on SQLite: `clt train` under
torchrun (two feature shards) writes progress lines into the flow's log and its params and per-step metrics into
the flow's MLflow run, directly (no re-reading of metrics.jsonl)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from prefect import flow

from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.store import ActivationStore
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.train.config import TrainConfig
from flows import registry, tasks

STEPS = 20
PROGRESS = re.compile(r"train: step (\d+)/20 \(\d+%\)(?:, loss [\d.e+-]+)?, [\d,]+ tok/s, (?:ETA|done in) [\dhms]+")


@flow(name="train-task-test")
def train_in_a_run(store: str, out_dir: str, config: TrainConfig, uri: str) -> tuple[str, dict]:
    with registry.tracking(uri), mlflow.start_run(experiment_id=registry.experiment_id("train-task")) as run:
        mlflow.log_params({"train.training_steps": config.training_steps})
        trained = tasks.train({"url": store, "fingerprint": "test"}, config, out_dir, 2, run.info.run_id)
    return run.info.run_id, trained


def flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            return [log.message for log in logs]

    return asyncio.run(read())


def test_the_train_task_logs_progress_and_its_metrics_into_the_flow_s_mlflow_run(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = str(tmp_path / "store")
    make_synthetic_store(store, SyntheticConfig(rows=4096, num_layers=3, d_model=16, num_features=32,
                                                active_per_token=4, rows_per_chunk=256, dtype="float32"))  # fmt: skip
    compute_norm_stats(ActivationStore.open(store, "a"), progress=False)
    config = TrainConfig.from_dict({
        "model": {"num_features": 64, "activation_fn": "batchtopk", "k": 4},
        "sampler": {"batch_size": 128, "holdout_fraction": 0.1, "buffer_chunks": 2}, "training_steps": STEPS,
        "log_interval": 5, "eval_interval": 10, "checkpoint_interval": 10, "eval_rows": 256,
    })  # fmt: skip
    monkeypatch.setattr(tasks, "PROGRESS_SECONDS", 0.0)  # a line every step
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = train_in_a_run(store, str(tmp_path / "run"), config, uri, return_state=True)
    assert state.is_completed(), state.message
    run_id, trained = state.result()
    assert trained["mlflow_run_id"] == run_id and Path(trained["url"], "model.safetensors").exists()

    logs = flow_logs(state.state_details.flow_run_id)
    steps = [int(m.group(1)) for line in logs if (m := PROGRESS.search(line))]
    assert steps == list(range(1, STEPS + 1)), logs  # printed once (rank 0), in order, the last at the end
    assert any("done in" in line and "held-out NMSE" in line for line in logs)
    # The small-step rule holds under the launcher: one thread per rank, though the launcher shared out the cores.
    assert any("estimated peak memory per rank" in line and "; 1 CPU thread per rank" in line for line in logs), logs

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss/total")] == [5, 10, 15, 20]
    assert "train/eval/mean_nmse" in run.data.metrics and "train/tokens_per_second" in run.data.metrics
    params = run.data.params
    assert (params["train/model.num_layers"], params["train/model.d_model"]) == ("3", "16")  # resolved
    assert params["train/training_steps"] == params["train.training_steps"] == str(STEPS)
    assert not any("mlflow_tracking_uri" in key for key in params)
    assert [a.path for a in client.list_artifacts(run_id, "train")] == ["train/feature_density.png"]
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
