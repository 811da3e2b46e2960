"""Where training runs and how the model is wrapped for it: the process group, the attention
kernels, activation checkpointing, torch.compile, FSDP2 and DDP.

    rank, world, device = setup_device(cfg)     # torchrun sets RANK and WORLD_SIZE
    model, set_grad_sync, compiled = wrap_model(cfg, raw_model, dtype, device, world)
"""
import os
from contextlib import ExitStack
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

import common

KERNEL_SETTING = ExitStack()   # the attention kernels' setting, held for the whole process
# attention_backends names -> torch's SDPA kernels (README: "Attention kernels").
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


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


def attention_backends(text):
    """"flash,efficient,math" -> [SDPBackend, ...] in that order, each once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SDPA_BACKENDS]
    if unknown or not names:
        problem = f"unknown kernel {', '.join(unknown)}" if unknown else "no kernel"
        raise ValueError(f"attention_backends={text!r}: {problem}; give SDPA kernels in priority "
                         f"order, from {', '.join(SDPA_BACKENDS)} (e.g. 'flash,efficient,math')")
    return [SDPA_BACKENDS[name] for name in dict.fromkeys(names)]


def set_attention_backends(backends):
    """From now on, in this process: SDPA may use only these kernels, trying them in this order
    (the first that supports a call's shapes, dtype and mask runs). torch 2.13 offers the priority
    only through the context manager sdpa_kernel, so it is entered here and held open by
    KERNEL_SETTING (a context manager that is garbage collected is left, restoring the old
    setting). Set before the first compile: compiled graphs keep the kernel chosen when traced."""
    KERNEL_SETTING.enter_context(sdpa_kernel(backends, set_priority=True))


def compile_in_place(module, fn_name="forward"):
    """module.<fn_name> compiled with fullgraph=True (a graph break is an error, not a silent fall
    back to eager), set on the instance: parameter names and state_dict keys stay as they are, and
    module hooks (FSDP's all-gather and reshard) run outside the compiled graph."""
    setattr(module, fn_name, torch.compile(getattr(module, fn_name), fullgraph=True))


def wrap_model(cfg, raw_model, dtype, device, world):
    """In place and in torchtitan's order: activation checkpointing, then each Block and the loss
    tail (final norm; LLM.loss: lm_head and the cross-entropy) compiled on its own, then FSDP2 per
    block and on the root; then DDP for several processes without FSDP -> (the model that trains,
    set_grad_sync(last) or None, compiled?). Gradients reduce on the last micro-step.
    The embedding, rotary tables and masks stay eager. raw_model is never wrapped, so it saves and
    evaluates with its own parameter names; its compiled parts recompile once for eval (no_grad)."""
    backends = attention_backends(cfg.attention_backends)   # a typo fails on any device
    if device.type == "cuda":
        set_attention_backends(backends)
    if cfg.activation_checkpointing:   # keep each block's input; recompute the rest in backward
        for block in raw_model.layers:
            block.forward = partial(recompute, block.forward, use_reentrant=False)
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    if use_compile:   # the blocks share one compiled graph: same code, same shapes
        for block in raw_model.layers:
            compile_in_place(block)
        compile_in_place(raw_model.norm)
        compile_in_place(raw_model, "loss")
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in raw_model.layers:   # one all-gather per block, overlapped with the one before
            fully_shard(block, mp_policy=mp)
        fully_shard(raw_model, mp_policy=mp)
        return raw_model, raw_model.set_requires_gradient_sync, use_compile
    if world == 1:
        return raw_model, None, use_compile
    model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    # set_grad_sync(last) sets model.require_backward_grad_sync = last
    return model, partial(setattr, model, "require_backward_grad_sync"), use_compile
