"""The native stack for real: SeaweedFS, PostgreSQL, an MLflow server and a Prefect server and worker; the
deployments are registered with `prefect deploy`, `clt-pipeline/manual` is triggered with `prefect deployment run`
on a tiny model, the worker runs it (training under torchrun on 2 processes, stores on S3), and the registered model,
its `champion` alias and its artifacts in S3 are checked. Slow: about two minutes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.stack.native import native_stack

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_a_deployment_run_trains_and_registers_through_the_worker(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = {
        "work_dir": str(tmp_path / "work"),
        "store_root": "s3://acts/stack-test",
        "extract": {"model": str(tiny_dirs["llama"]), "text": {"source": "packaged:kjv", "max_documents": 200},
                    "tokens": 4096, "context_size": 64, "batch_size": 8, "compute_dtype": "float32",
                    "chunk_rows": 128},
        "extract_shards": 2,
        "train": {"model": {"num_features": 64, "activation_fn": "batchtopk", "k": 4},
                  "sampler": {"batch_size": 256, "holdout_fraction": 0.25}, "training_steps": 20,
                  "log_interval": 10, "eval_interval": 20, "checkpoint_interval": 10, "eval_rows": 512},
        "nproc": 2,
        "convert": {"batches": 2},
        "evaluate": {"max_rows": 512, "tokens": 128, "text": "packaged:kjv", "text_batch_size": 4},
        "registry": {"model_name": "clt-stack-test"},
    }  # fmt: skip
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    with native_stack(tmp_path / "stack") as stack:
        env = {**os.environ, **stack.env()}

        def prefect(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            run = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=timeout)  # fmt: skip
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            return run

        prefect("deploy", "--all")
        run = prefect("deployment", "run", "clt-pipeline/manual", "--param", f"config_file={config_file}", "--watch",
                      timeout=600)  # fmt: skip
        assert "Completed" in run.stdout
        worker_log = (tmp_path / "stack" / "worker.log").read_text()
        assert "--nproc_per_node=2" in worker_log

        import boto3
        from mlflow import MlflowClient

        client = MlflowClient(stack.mlflow_url)
        champion = client.get_model_version_by_alias("clt-stack-test", "champion")
        assert champion.tags["promoted"] == "true" and champion.tags["store"].startswith("s3://acts/stack-test/")
        s3 = boto3.client("s3", endpoint_url=stack.s3.endpoint, aws_access_key_id=stack.s3.access_key,
                          aws_secret_access_key=stack.s3.secret_key, region_name="us-east-1")  # fmt: skip
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith("W_enc_0.safetensors") for k in keys)
        stores = s3.list_objects_v2(Bucket="acts", Prefix="stack-test/").get("KeyCount", 0)
        assert stores > 0
        assert stack.s3.secret_key not in worker_log  # credentials never reach the run log
