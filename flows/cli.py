"""`clt models`: the MLflow model registry from the `clt` command. The registry lives with the orchestration, so
this package adds the subcommand to `clt` as a plugin (entry point `models` of the group `clt_pipeline.commands` in
pyproject.toml): the core never imports `flows`, and loading this module imports nothing heavy (MLflow only when
the command runs).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clt_core.cli import AddCommand


def register(add: AddCommand) -> None:
    """The entry point: add `clt models list|get`."""
    p = add("models", _models, "Registered models in MLflow: list them, or get one's circuit-tracer files.")
    p.add_argument("action", choices=["list", "get"])
    p.add_argument("reference", nargs="?", help="get: NAME@ALIAS (e.g. clt@champion) or NAME/VERSION")
    p.add_argument("--out", help="get: directory to create")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")


def _models(args: argparse.Namespace) -> int:
    from clt_core.errors import ConfigError
    from flows.registry import download_model, list_models, tracking

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("no MLflow tracking URI: pass --tracking-uri (e.g. sqlite:///demo-output/mlflow.db)")
    database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if database is not None and not Path(database).is_file():  # MLflow would create an empty registry there
        raise ConfigError(f"no MLflow database at {database} (tracking URI {uri}); check --tracking-uri")
    if args.action == "get" and (not args.reference or not args.out):
        raise ConfigError("usage: clt models get NAME@ALIAS|NAME/VERSION --out DIR")
    with tracking(uri):
        if args.action == "list":
            for row in list_models():
                metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(row["metrics"].items()) if k in ("mean_nmse",
                                    "total_l0", "ce_recovered"))  # fmt: skip
                aliases = f" @{','.join(row['aliases'])}" if row["aliases"] else ""
                print(f"{row['name']} v{row['version']}{aliases}: {metrics} ({row['reason']})")
        else:
            print(f"circuit-tracer files of {args.reference} in {download_model(args.reference, args.out)}")
    return 0
