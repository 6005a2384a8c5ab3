"""prefect.yaml: both deployments point at the real flow, with parameters it accepts and config files that parse."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]


def test_deployments_name_the_flow_and_valid_configs() -> None:
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"manual", "scheduled-retrain"}
    for deployment in deployments.values():
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "clt-pipeline"
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
        PipelineConfig.from_yaml(ROOT / deployment["parameters"]["config_file"])  # raises on a bad config
        assert deployment["work_pool"]["name"] == "clt-process" and deployment["concurrency_limit"] == 1
    assert deployments["scheduled-retrain"]["schedules"][0]["cron"] == "0 3 * * 0"
