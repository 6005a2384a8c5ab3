"""The one tracking interface the library uses: parameters once, metrics per step, artifacts at the end.

`JsonlTracker` appends one JSON object per call to `metrics.jsonl`; `MlflowTracker` logs to an MLflow run: a run
of its own, or one started elsewhere (the pipeline's, named by `MLFLOW_RUN_ID`). Values must never hold secrets:
`flatten_params` masks the password of any URL.
"""

from __future__ import annotations

import atexit
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...


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
    """Logs to the MLflow run `run_id` (left running: it belongs to whoever started it), else to the active run, else
    to a new run in `experiment` that `close` ends (and that ends as FAILED if the process exits first). Metric and
    param names get `prefix` (e.g. `train/` in a run shared with other stages); artifacts go under it too."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "clt",
        run_name: str | None = None,
        *,
        run_id: str | None = None,
        prefix: str = "",
    ) -> None:
        import mlflow
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri)  # None: MLflow's default (MLFLOW_TRACKING_URI)
        self.prefix = prefix
        self._owns_run = False
        if run_id is None and (active := mlflow.active_run()) is not None:
            run_id = active.info.run_id
        if run_id is None:
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
            run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            self._owns_run = True
            atexit.register(self._end, "FAILED")
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(f"{self.prefix}{k}", v) for k, v in flatten_params(params).items()]
        for i in range(0, len(flat), 100):  # MLflow's limit of params per batch
            self._client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{self.prefix}{k}", float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        for i in range(0, len(batch), 1000):  # MLflow's limit of metrics per batch
            self._client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path=self.prefix.strip("/") or None)

    def close(self) -> None:
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self._owns_run:
            self._owns_run = False
            atexit.unregister(self._end)
            self._client.set_terminated(self.run_id, status)


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    """Nested config -> MLflow params: dotted keys, values as strings of at most 500 characters (MLflow's limit), the
    password of a URL (`scheme://user:password@host`) masked."""
    return {k: _URL_PASSWORD.sub(r"\1***@", str(v))[:500] for k, v in _flatten(params).items()}


_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")


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
