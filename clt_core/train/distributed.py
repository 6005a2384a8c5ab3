"""Feature shards from a `torchrun` environment: gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import itertools
import os

import torch
import torch.distributed as dist

from clt_core.model.parallel import FeatureShards

_GROUPS = itertools.count()
"""Process groups set up by this process so far: each gets rendezvous keys of its own."""


def init_feature_shards(device: str) -> FeatureShards:
    """One shard per process when launched by torchrun (WORLD_SIZE > 1), else a single shard."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return FeatureShards()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # A store prefix per group: a re-created default group would otherwise find the destroyed group's
        # rendezvous keys (same group name, same prefix) and try to connect to its closed addresses.
        store, rank, world_size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"clt/feature_shards/{next(_GROUPS)}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    return FeatureShards(dist.get_rank(), dist.get_world_size())


def close_feature_shards(shards: FeatureShards) -> None:
    if shards.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
