"""The MLflow registry on a real SQLite store: the champion gate, idempotent registration, the pyfunc model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from clt_core.data.sampler import Normalizer
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import save
from flows.registry import CHAMPION, Gate, decide, register_model

NAME = "clt-test"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = CrossLayerTranscoder(CLTConfig(num_layers=3, d_model=8, num_features=16, activation_fn="jumprelu"))
    norm = Normalizer(torch.randn(3, 8), torch.rand(3, 8) + 0.5, torch.randn(3, 8), torch.rand(3, 8) + 0.5)
    save(tmp_path / "model", model, norm, {"data": "/nowhere"})
    return tmp_path / "model"


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    return uri


def test_the_gate_compares_at_matched_l0() -> None:
    gate = Gate()
    assert decide({"mean_nmse": 0.2, "total_l0": 10}, None, gate).promote
    assert decide({"mean_nmse": 0.1, "total_l0": 10}, {"mean_nmse": 0.2, "total_l0": 10}, gate).promote
    assert not decide({"mean_nmse": 0.3, "total_l0": 10}, {"mean_nmse": 0.2, "total_l0": 10}, gate).promote
    refused = decide({"mean_nmse": 0.1, "total_l0": 20}, {"mean_nmse": 0.2, "total_l0": 10}, gate)
    assert not refused.promote and "L0" in refused.reason  # lower NMSE bought with more active features
    assert not decide({"mean_nmse": float("nan")}, None, gate).promote
    ce = Gate(metric="ce_recovered", higher_is_better=True)
    assert decide({"ce_recovered": 0.9}, {"ce_recovered": 0.8}, ce).promote


def test_an_experiment_that_cannot_be_created_reports_the_store_error(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an experiment made meanwhile by a parallel run is looked up again; any other failure is MLflow's own."""
    from mlflow.exceptions import MlflowException

    from flows.registry import experiment_id

    def refuse(self: MlflowClient, name: str) -> str:
        raise MlflowException(f"cannot create experiment {name!r}: read-only store")

    monkeypatch.setattr(MlflowClient, "create_experiment", refuse)
    with pytest.raises(MlflowException, match="read-only store"):  # not an AttributeError on None
        experiment_id("never-made")
    assert experiment_id("registry-test")  # an existing one is found, nothing is created


def test_champion_moves_only_to_a_better_version(model_dir: Path, tracking: str) -> None:
    client = MlflowClient()
    results = []
    for nmse in (0.2, 0.3, 0.1):
        with mlflow.start_run():
            results.append(register_model(model_dir, None, NAME, {"mean_nmse": nmse, "total_l0": 8.0}))
            again = register_model(model_dir, None, NAME, {"mean_nmse": nmse, "total_l0": 8.0})
            assert again["reused"] and again["version"] == results[-1]["version"]  # idempotent per run
    assert [r["promoted"] for r in results] == [True, False, True]
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3
    champion = client.get_model_version_by_alias(NAME, CHAMPION)
    assert str(champion.version) == results[2]["version"]  # int on SQLite, str over REST
    refused = client.get_model_version(NAME, results[1]["version"])
    assert refused.tags["promoted"] == "false" and "not better" in refused.tags["promotion_reason"]
    assert refused.tags["metric.mean_nmse"] == "0.3"


def test_the_champion_loads_as_pyfunc_in_a_fresh_process(model_dir: Path, tracking: str, tmp_path: Path) -> None:
    with mlflow.start_run():
        register_model(model_dir, None, NAME, {"mean_nmse": 0.1})
    x = np.random.default_rng(0).normal(size=(5, 3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = f"""
import mlflow, numpy as np
m = mlflow.pyfunc.load_model("models:/{NAME}@{CHAMPION}")
x = np.load("{tmp_path / "x.npy"}")
np.save("{tmp_path / "y.npy"}", m.predict(x))
np.save("{tmp_path / "f.npy"}", m.predict(x, params={{"output": "features"}}))
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    from clt_core.model.directory import load, read_normalizer

    model, norm = load(model_dir).model, read_normalizer(model_dir)
    out = model(norm.inputs(torch.from_numpy(x)))
    expected = norm.raw_targets(out.reconstruction).detach().numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), out.activations.detach().numpy(), rtol=1e-5, atol=1e-6)
