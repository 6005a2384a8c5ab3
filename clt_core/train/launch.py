"""The one torchrun launcher of `clt train`: the command line and the environment of its ranks, used by
`clt train --nproc N` (`clt_core/cli.py`) and the pipeline's train task (`flows/tasks.py`).

Threads: torchrun sets OMP_NUM_THREADS=1 for every rank when it is unset and there are several ranks. The launcher
sets it first, to this machine's cores divided among the ranks, and marks the value as its own
(`CLT_LAUNCHER_OMP_NUM_THREADS`), so the trainer can tell it from a user's setting and still run small steps on one
thread (`clt_core/train/memory.py:small_step`). A value the user set is passed on unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

LAUNCHER_THREADS = "CLT_LAUNCHER_OMP_NUM_THREADS"
"""Set beside OMP_NUM_THREADS when the launcher chose its value (the user did not set one)."""


def torchrun_command(
    args: Sequence[str], nproc: int, env: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """`python -m torch.distributed.run --standalone --nproc_per_node=NPROC -m clt_core.cli ARGS` and the environment
    to run it with (`env`, default the process's, plus the ranks' thread count when the user set none)."""
    env = dict(os.environ if env is None else env)
    if nproc > 1 and not env.get("OMP_NUM_THREADS"):  # unset or empty
        env["OMP_NUM_THREADS"] = env[LAUNCHER_THREADS] = str(max(1, _cores() // nproc))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "clt_core.cli", *args], env


def threads_set_by_user(env: Mapping[str, str] | None = None) -> bool:
    """Whether OMP_NUM_THREADS holds a user's setting (and not the launcher's default for its ranks)."""
    env = os.environ if env is None else env
    value = env.get("OMP_NUM_THREADS")
    return bool(value) and value != env.get(LAUNCHER_THREADS)


def _cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
