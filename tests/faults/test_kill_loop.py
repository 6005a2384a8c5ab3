"""SIGKILL at random moments, again and again: extraction (local disk and S3) and training under torchrun resume to
exactly what an uninterrupted run produces."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clt_core.data.store import ActivationStore
from clt_core.extract.extractor import ExtractConfig, extract

pytestmark = pytest.mark.slow

KILLS = 10


def _kill_after(args: list[str], seconds: float, started: Callable[[], bool] = lambda: True) -> int | None:
    """Start `args` in its own process group; once `started()` holds, SIGKILL the whole group after `seconds`.
    Returns the kill's exit status, or None if the command finished first."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not started() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        proc.wait(timeout=seconds)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        return None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.returncode


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_url")


def test_extraction_killed_ten_times_then_finished_equals_an_uninterrupted_run(
    url: str, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = ExtractConfig(model=str(tiny_dirs["llama"]), text={"source": "packaged:kjv", "max_documents": 3000},
                        tokens=30000, context_size=64, batch_size=1, compute_dtype="float32",
                        storage_dtype="bfloat16", chunk_rows=128)  # fmt: skip
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    args = [sys.executable, "-m", "clt_core.cli", "extract", "--quiet", "--config", str(tmp_path / "extract.yaml"),
            "--out", url]  # fmt: skip
    rng = random.Random(0)
    committed: list[int] = []

    def rows() -> int:
        try:
            return ActivationStore.open(url).num_rows
        except Exception:  # not created yet, or being created
            return 0

    for i in range(KILLS):
        # Even kills: any moment from the start (loading the model, counting the corpus, creating the store);
        # odd ones: a moment after a random number of further chunks was committed (writing rows, committing,
        # refolding the norm stats), so the machine's speed does not decide where kills land.
        target = rows() + 128 * rng.randint(1, 30)
        started = (lambda: True) if i % 2 == 0 else (lambda: rows() >= target)  # noqa: B023
        if _kill_after(args, rng.uniform(0.5, 5.0) if i % 2 == 0 else rng.uniform(0.0, 0.3), started) is None:
            break  # it finished before the kill: the remaining kills would find nothing to interrupt
        committed.append(rows())
    extract(url, cfg, progress=False)
    reference = extract(str(tmp_path / "reference"), cfg, progress=False).url

    assert len(committed) >= 5 and any(0 < c < cfg.tokens for c in committed), committed  # it was killed mid-way
    a, b = ActivationStore.open(reference), ActivationStore.open(url)
    assert a.num_rows == b.num_rows == cfg.tokens
    ra, rb = a.read(0, cfg.tokens), b.read(0, cfg.tokens)
    assert torch.equal(ra.token_ids, rb.token_ids)  # no duplicate or missing token: the same ids in the same rows
    assert torch.equal(ra.inputs.view(torch.uint16), rb.inputs.view(torch.uint16))
    assert torch.equal(ra.targets.view(torch.uint16), rb.targets.view(torch.uint16))
    sa, sb = a.read_norm_stats(), b.read_norm_stats()
    assert all(np.array_equal(getattr(sa, n), getattr(sb, n)) for n in ("inputs_mean", "inputs_std"))


def _losses(run: Path) -> dict[int, float]:
    """Step -> training loss; a resumed run logs the steps after its checkpoint again, the last line wins."""
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/total" in record:
            out[record["step"]] = record["loss/total"]
    return out


@pytest.mark.parametrize("victim", ["job", "rank"])
def test_training_killed_under_torchrun_resumes_to_the_uninterrupted_losses(victim: str, tmp_path: Path) -> None:
    from clt_core.data.norm_stats import compute_norm_stats
    from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store

    store = str(tmp_path / "store")
    make_synthetic_store(store, SyntheticConfig(rows=8192, num_layers=3, d_model=32, num_features=64,
                                                active_per_token=4, rows_per_chunk=256, dtype="float32"))  # fmt: skip
    compute_norm_stats(ActivationStore.open(store, "a"), progress=False)
    steps = 400
    common = [
        "--quiet",
        "--data",
        store,
        "--num-features",
        "128",
        "--activation-fn",
        "batchtopk",
        "--k",
        "4",
        "--batch-size",
        "256",
        "--holdout-fraction",
        "0.1",
        "--training-steps",
        str(steps),
        "--log-interval",
        "1",
        "--eval-interval",
        "1000",
        "--checkpoint-interval",
        "5",
        "--eval-rows",
        "512",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "clt_core.cli", "train"]  # fmt: skip
    killed = tmp_path / "killed"
    rng = random.Random(1)

    def newest() -> int:
        return max((int(p.name[5:]) for p in (killed / "checkpoints").glob("step_*")), default=0)

    interrupted_at = []  # the newest checkpoint's step after each kill
    for i in range(3):
        # Kill once training passed a random step of this attempt's third of the run (so the machine's speed does
        # not decide whether a kill lands), a random fraction of a second later: mid-step, mid-save, anywhere.
        target = rng.randint(20 + 120 * i, 100 + 120 * i)
        proc = subprocess.Popen([*torchrun, *common, "--out", str(killed), "--resume"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while newest() < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, f"training ended before step {target}"
        if victim == "job":
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # one rank dies: torchrun stops the other and the job fails
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            os.kill(int(ranks[-1]), signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
        interrupted_at.append(newest())
    assert not (killed / "final").exists() and 0 < interrupted_at[-1] < steps, interrupted_at
    subprocess.run([*torchrun, *common, "--out", str(killed), "--resume"], check=True, timeout=600)
    subprocess.run([*torchrun, *common, "--out", str(tmp_path / "whole")], check=True, timeout=600)
    a, b = _losses(tmp_path / "whole"), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), [s for s in a if a[s] != b[s]][:5]
