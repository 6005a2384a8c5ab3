"""Runs several trainings in turn in one torchrun launch, so that feature-parallel tests pay its start-up once.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/integration/tp_worker.py RUNS.json

RUNS.json: `{"collective_timeout_s": 20, "runs": [{"config": <TrainConfig dump>, "resume": false}, ...]}`. Every
process calls `train()` for each run in order, and after each run rewrites `RUNS.rank<R>.json` with one outcome per
finished run, `{"output_dir", "steps", "error"}` (error None on success), so that one failing run is reported and
does not take the later ones down with it.

Before each run the worker sets up the default process group itself, with a short collective timeout, so that a
run whose ranks issue mismatched collectives fails quickly instead of waiting for the default 30 minutes;
`init_feature_shards` finds it initialised and uses it, and `close_feature_shards` tears it down as usual.
(`clt train --nproc N` goes through `init_feature_shards`' own set-up, tested by the CLI test.)
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from clt_core.train.config import TrainConfig
from clt_core.train.trainer import train


def _fresh_process_group(index: int, timeout: timedelta) -> None:
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    prefixed = dist.PrefixStore(f"tp_worker/run_{index}", store)
    dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world_size, timeout=timeout)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: tp_worker.py RUNS.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    timeout = timedelta(seconds=float(spec.get("collective_timeout_s", 60)))
    rank = int(os.environ.get("RANK", "0"))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    outcomes: list[dict[str, Any]] = []
    for index, run in enumerate(spec["runs"]):
        config = TrainConfig.model_validate(run["config"])
        outcome: dict[str, Any] = {"output_dir": config.output_dir, "steps": None, "error": None}
        try:
            if distributed:
                _fresh_process_group(index, timeout)
            outcome["steps"] = train(config, resume=bool(run.get("resume", False)), progress=False).steps
        except Exception as err:
            outcome["error"] = f"{type(err).__name__}: {err}"
            if err.__context__ is not None:  # e.g. the teardown's barrier failing after a collective timed out
                outcome["error"] += f" (while handling {type(err.__context__).__name__}: {err.__context__})"
            traceback.print_exc()
        finally:
            if dist.is_initialized():  # a failed run may leave its group behind
                dist.destroy_process_group()
        print(f"rank {rank}: {config.output_dir}: {outcome}", flush=True)
        outcomes.append(outcome)
        spec_path.with_suffix(f".rank{rank}.json").write_text(json.dumps(outcomes, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
