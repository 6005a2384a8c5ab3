"""The clt-pipeline flow for real (Prefect test harness, MLflow on SQLite) on a tiny model: every stage runs, a
second run is fully cached, a changed training setting re-runs training and what follows it only."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from pipelines import STAGES, pipeline_config, run_pipeline, summary_artifact

from flows.pipeline import tracking_uri


def test_stages_run_then_cache_then_rerun_from_training(
    prefect_harness, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = pipeline_config(tiny_dirs["llama"], tmp_path / "work")
    first, states, flow_run_id = run_pipeline(config)
    assert sorted(states) == sorted(STAGES)
    assert all(s == ["Completed"] * len(s) for s in states.values()), states
    assert len(states["extract-shard"]) == 2
    assert first["registered"]["promoted"] and first["registered"]["version"] == "1"
    assert Path(first["export"], "W_enc_0.safetensors").exists()
    summary = summary_artifact(flow_run_id)
    assert "| mean_nmse |" in summary and first["mlflow_run_id"] in summary

    second, states, _ = run_pipeline(config)
    assert {name: set(s) for name, s in states.items() if name != "register"} == {
        name: {"Cached"} for name in STAGES if name != "register"
    }
    assert second["registered"]["reused"] and second["registered"]["version"] == "1"  # no duplicate version

    changed = pipeline_config(tiny_dirs["llama"], tmp_path / "work", training_steps=30)
    third, states, _ = run_pipeline(changed)
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
    # Logged by the training subprocess itself: the resolved model geometry, not the config's unset values.
    from clt_core.data.store import ActivationStore

    store = ActivationStore.open(first["scrambled"])
    assert run.data.params["train/model.num_layers"] == str(store.num_layers) and run.data.params[
        "train/model.d_model"] == str(store.d_model)  # fmt: skip
    assert run.data.params["train/training_steps"] == "30" and "train/eval/mean_nmse" in run.data.metrics
    # The cached second run holds no training metrics of its own: it names the run that trained.
    cached = client.get_run(second["mlflow_run_id"])
    assert cached.data.tags["train_run_id"] == first["mlflow_run_id"]
    assert not any(key.startswith("train/") for key in cached.data.metrics)

    # The registry from the command line: list the versions, fetch the champion's circuit-tracer files.
    from clt_core.cli import main

    uri = tracking_uri(config)
    assert main(["models", "list", "--tracking-uri", uri]) == 0
    assert main(["models", "get", "clt@champion", "--out", str(tmp_path / "got"), "--tracking-uri", uri]) == 0
    assert (tmp_path / "got" / "W_dec_0.safetensors").exists() and (
        tmp_path / "got" / "native" / "config.json"
    ).exists()
    assert main(["models", "get", "missing@champion", "--out", str(tmp_path / "x"), "--tracking-uri", uri]) == 2


def test_a_live_pipeline_trains_from_the_model_then_converts_evaluates_and_registers(
    prefect_harness, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from flows.config import PipelineConfig

    base = pipeline_config(tiny_dirs["llama"], tmp_path / "work").model_dump(mode="json")
    base["source"] = "live"
    extract = base["extract"]
    base["train"]["live"] = {"model": extract["model"], "text": extract["text"], "tokens": 5120,
                             "context_size": 64, "compute_dtype": "float32", "shuffle_rows": 1024,
                             "held_out_tokens": 2048}  # fmt: skip
    config = PipelineConfig.from_dict(base)
    first, states, flow_run_id = run_pipeline(config)
    assert sorted(states) == ["convert", "evaluate", "export", "register", "train"]  # no store stages
    assert all(s == ["Completed"] for s in states.values()), states
    assert first["registered"]["promoted"] and first["store"].endswith("held_out")
    assert "held-out rows (live)" in summary_artifact(flow_run_id)
    run = MlflowClient(tracking_uri(config)).get_run(first["mlflow_run_id"])
    assert run.data.params["train/training_steps"] == "20" and run.data.tags["source"] == "live"  # 5120 / 256

    second, states, _ = run_pipeline(config)
    assert set(states["train"]) == {"Cached"} and second["checkpoint"] == first["checkpoint"]
