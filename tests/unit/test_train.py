"""Training on synthetic stores: a planted dictionary is recovered, resume is exact, bad runs are refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.sampler import SamplerConfig, make_normalizer
from clt_core.data.store import ActivationStore
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.errors import CLTError
from clt_core.model.config import CLTConfig
from clt_core.model.directory import load, read_normalizer, read_source
from clt_core.train.config import TrainConfig
from clt_core.train.schedules import lr_factor, sparsity_factor
from clt_core.train.step import TrainStep
from clt_core.train.trainer import checkpoints, train


def synthetic(url: str, **kw: object) -> str:
    spec = {"rows": 8192, "num_layers": 3, "d_model": 32, "num_features": 64, "active_per_token": 4}
    spec.update({"rows_per_chunk": 256, "dtype": "float32", "noise": 0.01, **kw})
    make_synthetic_store(url, SyntheticConfig(**spec))
    compute_norm_stats(ActivationStore.open(url, "a"), progress=False)
    return url


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return synthetic(str(tmp_path_factory.mktemp("data") / "store"))


def config(data: str | None, out: Path, **kw: object) -> TrainConfig:
    base = {
        "data": data,
        "output_dir": str(out),
        "model": CLTConfig(num_features=128, activation_fn="batchtopk", k=4),
        "sampler": SamplerConfig(batch_size=256, holdout_fraction=0.1, buffer_chunks=2),
        "training_steps": 20,
        "learning_rate": 1e-3,
        "log_interval": 1,
        "eval_interval": 10,
        "checkpoint_interval": 10,
        "eval_rows": 512,
    }
    return TrainConfig(**{**base, **kw})


def logged(out: Path) -> list[tuple[int, float]]:
    """(step, total loss) of every training-metrics line, in file order."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/total"]) for r in lines if "loss/total" in r]


def step_losses(out: Path) -> dict[int, float]:
    return dict(logged(out))


def planted_run(data: str, out: Path, steps: int, **kw: object) -> TrainConfig:
    """The planted-dictionary run: F=256 batchtopk k=4 on a 4-layer store, evaluated once at the end."""
    return config(
        data,
        out,
        model=CLTConfig(num_features=256, activation_fn="batchtopk", k=4),
        sampler=SamplerConfig(batch_size=512, holdout_fraction=0.1, buffer_chunks=4),
        training_steps=steps,
        learning_rate=3e-3,
        eval_interval=steps,
        checkpoint_interval=steps,
        eval_rows=4096,
        **kw,
    )


def test_bf16_reaches_the_float32_quality_on_a_planted_dictionary(tmp_path: Path) -> None:
    """Same data, same steps: bf16's held-out NMSE within 0.005 of float32's, and exactly k per token on average."""
    data = synthetic(
        str(tmp_path / "planted"), rows=16384, num_layers=4, d_model=64, num_features=128, dtype="bfloat16"
    )
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = planted_run(data, tmp_path / precision, 300, log_interval=10, precision=precision)
        results[precision] = train(cfg, progress=False)
    nmse = {p: r.evaluation["mean_nmse"] for p, r in results.items()}
    print(f"planted dictionary, held-out mean NMSE: {nmse}")
    assert abs(nmse["bf16"] - nmse["fp32"]) < 0.005
    lines = [json.loads(line) for line in (results["bf16"].output_dir / "metrics.jsonl").read_text().splitlines()]
    l0 = [r[f"l0/layer_{i}"] for r in lines if "l0/layer_0" in r for i in range(4)]
    assert sum(l0) / len(l0) == pytest.approx(4.0, abs=1e-9)  # batchtopk: k·B entries per layer, ties or not


def test_a_planted_dictionary_is_recovered(tmp_path: Path) -> None:
    data = synthetic(str(tmp_path / "planted"), rows=16384, num_layers=4, d_model=64, num_features=128)
    cfg = planted_run(data, tmp_path / "run", 400, log_interval=50)
    result = train(cfg, progress=False)
    ev = result.evaluation
    print(f"planted dictionary: held-out NMSE per layer {ev['nmse']}, L0 {ev['total_l0']:.2f}")
    assert max(ev["nmse"]) < 0.1
    assert ev["total_l0"] == pytest.approx(16, abs=1.0)  # k=4 per layer over 4 layers
    assert min(ev["explained_variance"]) > 0.9


@pytest.mark.parametrize(
    "settings",
    [
        {"model": CLTConfig(num_features=128, activation_fn="batchtopk", k=4), "auxk_coef": 1 / 32,
         "dead_feature_window": 512},
        {"model": CLTConfig(num_features=128, activation_fn="topk", k=4), "precision": "bf16"},
        {"model": CLTConfig(num_features=128, activation_fn="jumprelu"), "sparsity_lambda": 1e-2,
         "preactivation_coef": 1e-3, "sparsity_warmup_steps": 15, "lr_scheduler": "cosine", "warmup_steps": 3},
    ],
    ids=["batchtopk-auxk", "jumprelu-penalties", "topk-sparse-bf16"],
)  # fmt: skip
def test_resume_reproduces_the_uninterrupted_losses_bit_for_bit(
    store: str, tmp_path: Path, settings: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = train(config(store, tmp_path / "whole", **settings), progress=False)
    # The same run, interrupted during step 13 (after the step-10 checkpoint), then resumed.
    calls = {"n": 0}
    real_step = TrainStep.__call__

    def interrupt_at_step_13(self: TrainStep, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(TrainStep, "__call__", interrupt_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train(config(store, tmp_path / "resumed", **settings), progress=False)
    monkeypatch.setattr(TrainStep, "__call__", real_step)
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["step_10"]
    resumed = train(config(store, tmp_path / "resumed", **settings), resume=True, progress=False)
    assert resumed.steps == 20
    a, b = step_losses(whole.output_dir), step_losses(resumed.output_dir)
    # The resumed run appends to the same metrics file, repeating the steps after its checkpoint exactly.
    assert [step for step, _ in logged(resumed.output_dir)] == [*range(1, 13), *range(11, 21)]
    assert a == b  # exactly: same batches, same weights, same optimiser moments, same dead-feature counters
    wa, wb = load_file(str(whole.final / "model.safetensors")), load_file(str(resumed.final / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_during_training_then_resume_gives_the_same_losses(store: str, tmp_path: Path) -> None:
    cfg = config(store, tmp_path / "killed", training_steps=400, checkpoint_interval=5, eval_interval=1000)
    args = [sys.executable, "-m", "clt_core.cli", "train", "--quiet", "--data", store, "--out", cfg.output_dir,
            "--num-features", "128", "--activation-fn", "batchtopk", "--k", "4", "--batch-size", "256",
            "--holdout-fraction", "0.1", "--buffer-chunks", "2", "--training-steps", "400", "--learning-rate", "1e-3",
            "--log-interval", "1", "--eval-interval", "1000", "--checkpoint-interval", "5",
            "--eval-rows", "512"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    deadline = time.monotonic() + 120
    try:
        while not any(int(p.name.removeprefix("step_")) >= 10 for p in checkpoints(Path(cfg.output_dir))):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (Path(cfg.output_dir) / "final").exists()
    resumed = train(cfg.model_copy(update={"training_steps": 30}), resume=True, progress=False)
    whole = train(cfg.model_copy(update={"training_steps": 30, "output_dir": str(tmp_path / "whole")}), progress=False)
    a, b = step_losses(whole.output_dir), step_losses(resumed.output_dir)
    assert all(a[s] == b[s] for s in range(21, 31)), "the steps after the resume point are the same, bit for bit"


def test_a_finished_or_mismatched_run_is_refused(store: str, tmp_path: Path) -> None:
    train(config(store, tmp_path / "run", training_steps=10), progress=False)
    with pytest.raises(CLTError, match="--resume"):
        train(config(store, tmp_path / "run", training_steps=10), progress=False)
    with pytest.raises(CLTError, match="other settings"):
        train(config(store, tmp_path / "run", training_steps=20, learning_rate=1e-2), resume=True, progress=False)
    with pytest.raises(CLTError, match="d_model=16 but the store"):
        bad = CLTConfig(num_features=128, d_model=16)
        train(config(store, tmp_path / "other", model=bad), progress=False)
    with pytest.raises(CLTError, match="--data"):
        train(config(None, tmp_path / "nodata"), progress=False)


def test_a_checkpoint_from_before_a_new_setting_resumes(store: str, tmp_path: Path) -> None:
    cfg = config(store, tmp_path / "run", training_steps=10, checkpoint_interval=5)
    train(cfg, progress=False)
    state_file = tmp_path / "run" / "checkpoints" / "step_10" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["model"]["decoders"], state["config"]["live"]  # as written before those settings existed
    state_file.write_text(json.dumps(state))
    assert train(cfg.model_copy(update={"training_steps": 12}), resume=True, progress=False).steps == 12
    state_file = tmp_path / "run" / "checkpoints" / "step_12" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"]["decoders"] = "per_layer"  # a real difference is still refused
    state_file.write_text(json.dumps(state))
    with pytest.raises(CLTError, match="decoders"):
        train(cfg.model_copy(update={"training_steps": 14}), resume=True, progress=False)


def test_checkpoints_load_as_models_and_old_ones_are_pruned(store: str, tmp_path: Path) -> None:
    result = train(config(store, tmp_path / "run", training_steps=30, keep_checkpoints=2), progress=False)
    assert [p.name for p in checkpoints(result.output_dir)] == ["step_20", "step_30"]
    model = load(result.final).model
    weights = load_file(str(result.final / "model.safetensors"))
    assert torch.equal(model.W_enc.detach(), weights["W_enc"])
    assert weights["W_enc"].shape == (3, 128, 32) and weights["W_dec.1"].shape == (128, 2, 32)
    x = ActivationStore.open(store).read(0, 8).inputs.float()
    assert model(x).reconstruction.shape == (8, 3, 32)


def test_a_model_directory_carries_its_normalisation_and_source(store: str, tmp_path: Path) -> None:
    result = train(config(store, tmp_path / "run", training_steps=10), progress=False)
    data = ActivationStore.open(store)
    rows = data.read(0, 16)
    expected = make_normalizer(data, "auto")
    for directory in (result.final, checkpoints(result.output_dir)[-1]):
        normalizer = read_normalizer(directory)
        assert torch.equal(normalizer.inputs(rows.inputs), expected.inputs(rows.inputs))  # the training map, bitwise
        assert torch.allclose(normalizer.raw_targets(normalizer.targets(rows.targets)), rows.targets, atol=1e-5)
        source = read_source(directory)
        assert source["data"] == data.url and source["store"]["d_model"] == 32
    unnormalised = config(store, tmp_path / "raw", training_steps=10, sampler=SamplerConfig(
        batch_size=256, holdout_fraction=0.1, buffer_chunks=2, normalization_method="none"))  # fmt: skip
    assert read_normalizer(train(unnormalised, progress=False).final) is None


def test_schedules() -> None:
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(9, 10, 2, "linear") == pytest.approx(1 / 8)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(5, 10, 0, "linear_final20") == 1.0 and lr_factor(9, 10, 0, "linear_final20") == pytest.approx(0.5)
    assert [sparsity_factor(s, 4) for s in (0, 3, 10)] == [0.25, 1.0, 1.0] and sparsity_factor(0, 0) == 1.0


def test_metrics_and_the_density_plot_reach_mlflow(store: str, tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(store, tmp_path / "run", mlflow_tracking_uri=uri, mlflow_experiment="clt-test")
    result = train(cfg, progress=False)
    assert (result.final / "feature_density.png").stat().st_size > 1000
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("clt-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model.activation_fn"] == "batchtopk" and run.data.params["training_steps"] == "20"
    # The model's resolved geometry (from the store), not the config's unset values; no tracking URI among the params.
    assert (run.data.params["model.num_layers"], run.data.params["model.d_model"]) == ("3", "32")
    assert "mlflow_tracking_uri" not in run.data.params
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert [m.step for m in history] == list(range(1, 21))
    assert run.data.metrics["eval/mean_nmse"] == pytest.approx(result.evaluation["mean_nmse"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["feature_density.png"]
    assert run.info.status == "FINISHED"


def test_a_run_named_by_mlflow_run_id_gets_the_metrics_under_train_and_is_left_running(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How the pipeline's train task hands its MLflow run to the training subprocess: MLflow's own variables."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("pipeline")).info.run_id
    client.log_param(run_id, "train.training_steps", "20")  # the pipeline's own params are left alone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    result = train(config(store, tmp_path / "run", log_interval=5), progress=False)
    run = client.get_run(run_id)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss/total")] == [5, 10, 15, 20]
    assert run.data.metrics["train/eval/mean_nmse"] == pytest.approx(result.evaluation["mean_nmse"])
    assert (run.data.params["train/model.num_layers"], run.data.params["train/model.d_model"]) == ("3", "32")
    assert run.data.params["train/data"] == store and run.data.params["train.training_steps"] == "20"
    assert [a.path for a in client.list_artifacts(run_id, "train")] == ["train/feature_density.png"]
    assert run.info.status == "RUNNING"  # it belongs to whoever started it
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no run of its own


def test_mlflow_params_never_hold_a_url_password() -> None:
    from clt_core.tracking import flatten_params

    params = {"registry": {"tracking_uri": "postgresql://clt:hunter2@db:5432/mlflow"}, "data": "s3://acts/x",
              "uri": "http://user@host/x", "text": "a:b@c"}  # fmt: skip
    assert flatten_params(params) == {"registry.tracking_uri": "postgresql://clt:***@db:5432/mlflow",
                                      "data": "s3://acts/x", "uri": "http://user@host/x", "text": "a:b@c"}  # fmt: skip


def test_progress_lines_for_logs_replace_the_bar(store: str, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from clt_core.cli import main

    args = ["train", "--data", store, "--out", str(tmp_path / "run"), "--num-features", "128", "--activation-fn",
            "batchtopk", "--k", "4", "--batch-size", "256", "--holdout-fraction", "0.1", "--buffer-chunks", "2",
            "--training-steps", "20", "--log-interval", "2", "--eval-interval", "10", "--eval-rows", "512",
            "--progress-every", "0"]  # fmt: skip
    assert main(args) == 0
    out, err = capfd.readouterr()
    pattern = (r"^train: step (\d+)/20 \(\d+%\)(?:, loss [\d.e+-]+)?, [\d,]+ tok/s, "
               r"(?:ETA|done in) [\dhms]+(?:, held-out NMSE [\d.e+-]+)?$")  # fmt: skip
    lines = [line for line in out.splitlines() if line.startswith("train:")]
    steps = [int(re.match(pattern, line).group(1)) for line in lines]  # every line has the format
    assert steps == list(range(1, 21)), lines  # an interval of 0 s: one line a step, counts increasing
    assert "loss" in lines[1] and "held-out NMSE" in lines[10] and "held-out NMSE" not in lines[9]
    assert lines[-1].endswith(tuple("0123456789")) and "done in" in lines[-1] and "ETA" in lines[-2]
    assert "it/s" not in err and "step/s" not in err and "\r" not in err  # no tqdm bar


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_bf16_autocast_trains_close_to_float32(store: str, tmp_path: Path, activation: str) -> None:
    model = CLTConfig(num_features=128, activation_fn=activation, k=4)
    settings = {"model": model, "training_steps": 10, "sparsity_lambda": 1e-3 if activation == "jumprelu" else 0.0}
    fp32 = train(config(store, tmp_path / "fp32", **settings), progress=False)
    bf16 = train(config(store, tmp_path / "bf16", precision="bf16", **settings), progress=False)
    a, b = step_losses(fp32.output_dir), step_losses(bf16.output_dir)
    assert all(abs(a[s] - b[s]) <= 0.02 * abs(a[s]) for s in a), (a, b)
    assert load_file(str(bf16.final / "model.safetensors"))["W_enc"].dtype == torch.float32


def test_a_forged_or_truncated_checkpoint_is_refused_without_running_it(store: str, tmp_path: Path) -> None:
    import pickle

    result = train(config(store, tmp_path / "run", training_steps=10), progress=False)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights = result.final / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CLTError, match="not a valid safetensors file"):
        load(result.final)
    assert not marker.exists()  # never unpickled
    weights.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(CLTError, match="damaged"):
        load(result.final)
    weights.unlink()
    with pytest.raises(CLTError, match="missing"):
        load(result.final)


def test_the_memory_estimate_is_printed_and_a_run_that_cannot_fit_is_refused(
    store: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    train(config(store, tmp_path / "fits", training_steps=2), progress=False)
    assert "estimated peak memory per rank:" in capfd.readouterr().out
    huge = config(store, tmp_path / "huge", model=CLTConfig(num_features=4_000_000, activation_fn="batchtopk", k=4))
    with pytest.raises(CLTError, match=r"needs about .* GB per rank but the machine has .* GB: lower"):
        train(huge, progress=False)
    assert not (tmp_path / "huge").exists()  # refused before anything was allocated or written


def test_memory_estimate_parts() -> None:
    from clt_core.train.memory import estimate_memory

    model = CLTConfig(num_layers=30, d_model=576, num_features=2048, activation_fn="batchtopk", k=32)
    cfg = TrainConfig(model=model, precision="bf16", sampler=SamplerConfig(batch_size=4096))
    sparse = estimate_memory(model, cfg, sparse=True)
    params = 30 * 2048 * 576 + 2048 * 576 * 465 + 2 * 30 * 2048 + 30 * 576
    assert sparse.parameters == 4 * params and sparse.optimizer == 8 * params
    assert sparse.compute_copy == 2 * (params - 2 * 30 * 2048 - 30 * 576)
    halves = estimate_memory(model, cfg, sparse=True, world_size=2)  # feature shards split all but b_dec
    assert halves.parameters < 0.51 * sparse.parameters
    dense = estimate_memory(model, cfg.model_copy(update={"precision": "fp32"}), sparse=False)
    assert dense.gradients == 4 * params and dense.compute_copy == 0
