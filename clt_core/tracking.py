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


def _finite(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _plain(value: Any) -> Any:
    return str(value)
