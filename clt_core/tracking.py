"""The one tracking interface the library uses: parameters once, metrics per step, artifacts at the end.

`JsonlTracker` appends one JSON object per call to `metrics.jsonl` (and optionally prints a line); the orchestration
layer passes an MLflow-backed tracker with the same three methods. Values must never hold secrets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...


class NullTracker:
    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass


class JsonlTracker:
    """Metrics as JSON lines in `path`, appended (a resumed run continues the same file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, **{k: _finite(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path) -> None:
        self._write({"artifact": str(path)})


class Trackers:
    """Several trackers as one (the JSONL file always, MLflow when configured)."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path) -> None:
        for t in self.trackers:
            t.log_artifact(path)

    def close(self) -> None:
        for t in self.trackers:
            if hasattr(t, "close"):
                t.close()


class MlflowTracker:
    """Logs to an MLflow run: the active one if there is one, else a new run in `experiment`."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "clt", run_name: str | None = None) -> None:
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self._mlflow = mlflow
        self._owns_run = mlflow.active_run() is None
        if self._owns_run:
            mlflow.set_experiment(experiment)
            mlflow.start_run(run_name=run_name)

    def log_params(self, params: dict[str, Any]) -> None:
        self._mlflow.log_params(flatten_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace("/", "."): float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path) -> None:
        self._mlflow.log_artifact(str(path))

    def close(self) -> None:
        if self._owns_run:
            self._mlflow.end_run()


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    """Nested config -> MLflow params: dotted keys, values as strings of at most 500 characters (MLflow's limit)."""
    return {k: str(v)[:500] for k, v in _flatten(params).items()}


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _finite(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _plain(value: Any) -> Any:
    return str(value)
