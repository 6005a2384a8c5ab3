"""The compose stack's services started natively, for users without Docker and for the integration test:
SeaweedFS (S3), PostgreSQL, an MLflow server (Postgres backend, artifacts on S3), a Prefect server (Postgres) and a
Prefect worker on the `clt-process` pool, all on loopback with free ports.

    python -m infra.stack.native up [--dir .stack]     # starts them in the background, prints the environment
    python -m infra.stack.native down [--dir .stack]
    source .stack/env                                  # then: prefect deploy --all; prefect deployment run ...

Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment (or generated, written to the
0600 file `.stack/env`); PostgreSQL trusts only local socket and loopback connections of its own user.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from infra.stack.seaweedfs import S3Server, free_ports, seaweedfs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "clt-process"


@dataclass
class Stack:
    s3: S3Server
    postgres_url: str
    mlflow_url: str
    prefect_api: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """What a client process needs: S3, MLflow and Prefect endpoints."""
        return {
            **self.s3.env(),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
            "PREFECT_API_URL": self.prefect_api,
            "CLT_PIPELINE_DIR": str(ROOT),
        }


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` account then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout}s: {log.read_text()[-3000:]}")


def _start(args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


@contextlib.contextmanager
def postgres(data_dir: Path, port: int, databases: tuple[str, ...]) -> Iterator[str]:
    """A PostgreSQL cluster in `data_dir` on 127.0.0.1:`port` with `databases`; yields the base URL."""
    pg_bin = Path(
        subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip() or "/usr/bin"
    )
    initdb = shutil.which("initdb") or str(pg_bin / "initdb")
    pg_ctl = shutil.which("pg_ctl") or str(pg_bin / "pg_ctl")
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    data_dir.mkdir(parents=True, exist_ok=True)
    scratch = False
    if os.geteuid() == 0:
        if not all(os.stat(p).st_mode & 0o001 for p in data_dir.resolve().parents):
            # The postgres account cannot reach a directory under a private one (pytest's tmp, say): use /tmp.
            data_dir, scratch = Path(tempfile.mkdtemp(prefix="clt-postgres-")), True
            data_dir.chmod(0o755)
        shutil.chown(data_dir, "postgres", "postgres")
    sock = data_dir / "sock"
    if not (data_dir / "PG_VERSION").exists():
        made = subprocess.run([*_as_postgres_user(), initdb, "-D", str(data_dir), "-U", user, "--auth=trust",
                               "-E", "UTF8"], capture_output=True, text=True)  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr[-2000:]}")
    run = [*_as_postgres_user(), pg_ctl, "-D", str(data_dir), "-l", str(data_dir / "postgres.log"), "-w"]
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock.parent}"
    subprocess.run([*run, "-o", options, "start"], check=True, capture_output=True)
    try:
        psql = shutil.which("psql") or str(pg_bin / "psql")
        for db in databases:
            subprocess.run(
                [psql, "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "postgres", "-c", f"CREATE DATABASE {db}"],
                capture_output=True,
            )  # fmt: skip (exists on a restart)
        yield f"{user}@127.0.0.1:{port}"
    finally:
        subprocess.run([*run, "-m", "fast", "stop"], capture_output=True)
        if scratch:
            shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def native_stack(root: Path, timeout: float = 180) -> Iterator[Stack]:
    """Start every service under `root`; stop them all on exit."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    key = os.environ.get("AWS_ACCESS_KEY_ID") or "clt-local"
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24)
    pg_port, mlflow_port, prefect_port = free_ports(3)
    with seaweedfs(root / "s3", key, secret, ("acts", "mlflow")) as s3, \
            postgres(root / "postgres", pg_port, ("mlflow", "prefect")) as pg:  # fmt: skip
        stack = Stack(
            s3, f"postgresql://{pg}", f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        )
        quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env = {**os.environ, **s3.env(), **quiet, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        try:
            mlflow = _start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                             "--backend-store-uri", f"postgresql://{pg}/mlflow",
                             "--artifacts-destination", "s3://mlflow/artifacts", "--workers", "1"],
                            root / "mlflow.log", {**env, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint})  # fmt: skip
            stack.processes.append(mlflow)
            prefect_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg}/prefect"}
            server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                             str(prefect_port)], root / "prefect-server.log", prefect_env)  # fmt: skip
            stack.processes.append(server)
            _wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow, root / "mlflow.log", timeout)
            _wait_http(f"{stack.prefect_api}/health", server, root / "prefect-server.log", timeout)
            client_env = {**env, **stack.env()}
            subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                           env=client_env, check=True, capture_output=True)  # fmt: skip
            worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL], root / "worker.log",
                            client_env, cwd=ROOT)  # fmt: skip
            stack.processes.append(worker)
            yield stack
        finally:
            for proc in reversed(stack.processes):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in stack.processes:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def _serve(root: Path) -> None:
    """Run the stack until SIGTERM; `.stack/env` appears once every service answers."""
    env_file = root / "env"
    env_file.unlink(missing_ok=True)
    with native_stack(root) as stack:
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"export {k}={v}\n" for k, v in stack.env().items()))
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    env_file.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "serve"])
    parser.add_argument("--dir", default=".stack", help="state directory (default: .stack)")
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    pid_file = root / "pid"
    if args.action == "serve":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        _serve(root)
    elif args.action == "up":
        root.mkdir(parents=True, exist_ok=True)
        with (root / "stack.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "infra.stack.native", "serve", "--dir", str(root)],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)  # fmt: skip
        pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + 240
        while not (root / "env").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(
                    f"the stack did not start; see {root / 'stack.log'}:\n{(root / 'stack.log').read_text()[-3000:]}"
                )
            time.sleep(1)
        print(f"stack up; run `source {root / 'env'}` to use it:\n{(root / 'env').read_text()}")
    else:
        if not pid_file.exists():
            sys.exit(f"no stack running from {root}")
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(60):
                os.kill(pid, 0)
                time.sleep(1)
        pid_file.unlink()
        print("stack down")


if __name__ == "__main__":
    main()
