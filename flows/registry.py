"""The MLflow model registry: log a converted JumpReLU model as a pyfunc model, register it, and move the alias
`champion` only when its held-out evaluation beats the current champion's.

Every version is tagged with its metrics and with the gate's decision and reason, so the registry itself says why a
version was or was not promoted. The pyfunc model is "models from code" (`flows/pyfunc_model.py`): nothing pickled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


@contextmanager
def tracking(uri: str) -> Iterator[None]:
    """Point MLflow at `uri` for the block, then restore the previous URI *and* `MLFLOW_TRACKING_URI`:
    `mlflow.set_tracking_uri` also exports the variable, which would otherwise send every later pipeline run in this
    process (a notebook, a test session) to this run's tracking store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, variable = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None unsets it, though mlflow annotates str | Path
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def experiment_id(name: str) -> str:
    """The id of the experiment `name` in the current tracking store, created when missing (unlike
    `mlflow.set_experiment`, this sets no process-wide active experiment)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    if (experiment := client.get_experiment_by_name(name)) is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # made meanwhile by a parallel run
        if (experiment := client.get_experiment_by_name(name)) is None:
            raise  # not made meanwhile: creating it failed for another reason
        return experiment.experiment_id


@dataclass(frozen=True)
class Gate:
    """What "better" means: `metric` (from the evaluation), lower or higher better; an NMSE is only compared at a
    matched L0 (the challenger's total L0 at most `l0_slack` above the champion's)."""

    metric: str = "mean_nmse"
    higher_is_better: bool = False
    l0_slack: float = 0.1


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(challenger: dict[str, float], champion: dict[str, float] | None, gate: Gate) -> Decision:
    """Whether a version with metrics `challenger` should replace the version with metrics `champion`."""
    value = challenger.get(gate.metric)
    if value is None or not math.isfinite(value):
        return Decision(False, f"no finite {gate.metric} in the evaluation")
    if champion is None:
        return Decision(True, f"first version ({gate.metric}={value:.6g})")
    best = champion.get(gate.metric)
    if best is None or not math.isfinite(best):
        return Decision(True, f"the champion has no {gate.metric}")
    if "l0" not in gate.metric and "total_l0" in challenger and "total_l0" in champion:
        limit = champion["total_l0"] * (1 + gate.l0_slack)
        if challenger["total_l0"] > limit:
            above = f"L0 {challenger['total_l0']:.2f} is above the champion's {champion['total_l0']:.2f}"
            return Decision(False, f"{above} + {gate.l0_slack:.0%}")
    better = value > best if gate.higher_is_better else value < best
    relation = "better than" if better else "not better than"
    return Decision(better, f"{gate.metric}={value:.6g} is {relation} the champion's {best:.6g}")


def version_metrics(version: Any) -> dict[str, float]:
    """Metrics stored as `metric.NAME` tags on a model version."""
    return {k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")}


def register_model(
    model_dir: str | Path,
    export_dir: str | Path | None,
    name: str,
    metrics: dict[str, float],
    gate: Gate | None = None,
    tags: dict[str, str] | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """In the active MLflow run: log the pyfunc model (native files + circuit-tracer export), register it as a new
    version of `name`, tag it with `metrics`, and move `champion` to it if the gate says so. Idempotent: a run that
    already registered a version of `name`, or a model whose `fingerprint` (its weights' hash) is already a
    version, gets that version back, with nothing moved."""
    import mlflow
    from mlflow import MlflowClient

    gate = gate or Gate()
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_model needs an active MLflow run")
    client = MlflowClient()
    existing = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if v.run_id == run.info.run_id or (fingerprint is not None and v.tags.get("model_fingerprint") == fingerprint)
    ]
    if existing:
        found = existing[0]
        return {"name": name, "version": str(found.version), "promoted": found.tags.get("promoted") == "true",
                "reason": found.tags.get("promotion_reason", ""), "reused": True}  # fmt: skip
    artifacts = {"model": str(model_dir)}
    if export_dir is not None:
        artifacts["circuit_tracer"] = str(export_dir)
    info = mlflow.pyfunc.log_model(
        name="clt",
        python_model=str(PYFUNC_CODE),
        artifacts=artifacts,
        signature=_signature(model_dir),
        registered_model_name=name,
        pip_requirements=["clt-pipeline", "mlflow", "torch", "safetensors"],
    )
    version = str(info.registered_model_version)
    champion = _champion(client, name)
    decision = decide(metrics, None if champion is None else version_metrics(champion), gate)
    tags = {**(tags or {}), **({"model_fingerprint": fingerprint} if fingerprint else {})}
    for key, value in {**{f"metric.{k}": f"{v:.8g}" for k, v in metrics.items()}, **tags}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, "promoted", str(decision.promote).lower())
    client.set_model_version_tag(name, version, "promotion_reason", decision.reason)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    return {"name": name, "version": version, "promoted": decision.promote, "reason": decision.reason,
            "reused": False}  # fmt: skip


def _signature(model_dir: str | Path) -> Any:
    """Raw MLP inputs `[N, L, d]` float32 in, `[N, L, d]` (or features `[N, L, F]`) out; the `output` parameter."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    from clt_core.model.directory import read_config

    num_layers, d_model = read_config(Path(model_dir)).sizes()
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_layers, d_model))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_layers, -1))]),
        params=ParamSchema([ParamSpec("output", "string", "reconstruction")]),
    )


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def list_models() -> list[dict[str, Any]]:
    """Every registered model version: name, version, aliases, promotion and metrics (tracking URI from the
    environment or `mlflow.set_tracking_uri`)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    rows = []
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for v in client.search_model_versions(f"name='{model.name}'"):
            rows.append({"name": model.name, "version": str(v.version), "aliases": aliases.get(str(v.version), []),
                         "promoted": v.tags.get("promoted"), "reason": v.tags.get("promotion_reason", ""),
                         "metrics": version_metrics(v)})  # fmt: skip
    return sorted(rows, key=lambda r: (r["name"], int(r["version"])))


def download_model(reference: str, out: str | Path) -> Path:
    """`NAME@ALIAS` or `NAME/VERSION` -> `out` holds the circuit-tracer files, with our native model in
    `out/native`."""
    import shutil
    import tempfile

    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from clt_core.errors import ConfigError, first_line

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists; choose another --out")
    uri = f"models:/{reference}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except MlflowException as err:
            raise ConfigError(f"no registered model {reference!r} ({first_line(err)}); see `clt models list`") from None
        artifacts = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
        exported = artifacts.get("circuit_tracer")
        if exported is None:
            raise ConfigError(f"{reference} was registered without a circuit-tracer export")
        shutil.copytree(local / exported["path"], out)
        shutil.copytree(local / artifacts["model"]["path"], out / "native")
    return out
