"""Feature shards from a `torchrun` environment: gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from clt_core.model.parallel import FeatureShards


def init_feature_shards(device: str) -> FeatureShards:
    """One shard per process when launched by torchrun (WORLD_SIZE > 1), else a single shard."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return FeatureShards()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return FeatureShards(dist.get_rank(), dist.get_world_size())


def close_feature_shards(shards: FeatureShards) -> None:
    if shards.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
