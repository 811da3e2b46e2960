"""Where training runs and how the model is wrapped for it: the process group, activation
checkpointing, FSDP2, torch.compile and DDP.

    rank, world, device = setup_device(cfg)     # torchrun sets RANK and WORLD_SIZE
    model, set_grad_sync, compiled = wrap_model(cfg, raw_model, dtype, device, world)
"""
import os
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

import common


def setup_device(cfg):
    """-> (rank, world_size, device). torchrun sets RANK and WORLD_SIZE; else: one process."""
    if "RANK" not in os.environ:
        return 0, 1, common.pick_device(cfg.device)
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def wrap_model(cfg, raw_model, dtype, device, world):
    """Activation checkpointing and FSDP2 (in place), torch.compile, then DDP -> (the model that
    trains, set_grad_sync(last) or None, compiled?). Gradients reduce on the last micro-step."""
    if cfg.activation_checkpointing:   # keep each block's input; recompute the rest in backward
        for block in raw_model.layers:
            block.forward = partial(recompute, block.forward, use_reentrant=False)
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in raw_model.layers:   # one all-gather per block, overlapped with the one before
            fully_shard(block, mp_policy=mp)
        fully_shard(raw_model, mp_policy=mp)
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    model = torch.compile(raw_model) if use_compile else raw_model   # compile before wrapping
    if cfg.fsdp:
        return model, raw_model.set_requires_gradient_sync, use_compile
    if world == 1:
        return model, None, use_compile
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    # set_grad_sync(last) sets model.require_backward_grad_sync = last
    return model, partial(setattr, model, "require_backward_grad_sync"), use_compile
