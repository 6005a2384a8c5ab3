"""The one torchrun launcher (`clt_core/train/launch.py`): its command line and its ranks' threads."""

from __future__ import annotations

import sys

from clt_core.train.launch import LAUNCHER_THREADS, threads_set_by_user, torchrun_command


def test_the_command_runs_clt_under_torchrun() -> None:
    command, _ = torchrun_command(["train", "--config", "x.yaml"], 2, env={})
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                       "clt_core.cli", "train", "--config", "x.yaml"]  # fmt: skip


def test_several_ranks_share_the_cores_unless_the_user_set_the_threads() -> None:
    _, env = torchrun_command(["train"], 2, env={"PATH": "/bin"})
    assert env["PATH"] == "/bin" and int(env["OMP_NUM_THREADS"]) >= 1
    assert env[LAUNCHER_THREADS] == env["OMP_NUM_THREADS"]
    assert not threads_set_by_user(env)  # the trainer may still run a small step on one thread
    _, env = torchrun_command(["train"], 2, env={"OMP_NUM_THREADS": "3"})
    assert env["OMP_NUM_THREADS"] == "3" and LAUNCHER_THREADS not in env and threads_set_by_user(env)
    _, env = torchrun_command(["train"], 1, env={})
    assert "OMP_NUM_THREADS" not in env  # one process: torchrun leaves the variable alone, and so does the launcher
    assert not threads_set_by_user({}) and threads_set_by_user({"OMP_NUM_THREADS": "1", LAUNCHER_THREADS: "2"})
