"""A training run's plan, as pure functions of its config: the model it describes, its dtype,
micro-steps per step, the learning-rate schedule, GPU peaks, and the --plan table of memory, time
and cost.

    python train.py config/pretrain_1b.py --plan --plan_gpus=8    # parameters, memory, time, money

cfg is a train.TrainConfig everywhere here (train.py imports this module, never the reverse).
"""
import dataclasses
import json
import math
from pathlib import Path

import torch

import llm

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; the first name contained in the device name wins.
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(gpu_name):
    """The bf16 peak of a GPU by name, or None for one not in the table (then MFU is not logged)."""
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k.lower() in gpu_name.lower()), None)


def model_config(cfg, vocab_size):
    """The preset cfg.model, the config's model keys (every llm.ModelConfig field; None = the
    preset's), and the tokenizer's vocabulary (or cfg.vocab_size, a padded one at least that
    large)."""
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                         f"{vocab_size} tokens; leave vocab_size unset or raise it")
    keys = [f.name for f in dataclasses.fields(llm.ModelConfig)]
    overrides = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}
    overrides["vocab_size"] = cfg.vocab_size or vocab_size
    return llm.model_config(cfg.model, **overrides)


def check_shape(cfg, ckpt, vocab_size):
    """Refuse checkpoint ckpt when its model differs from the one cfg describes, naming each key."""
    saved = json.loads((Path(ckpt) / "meta.json").read_text())["model_config"]
    wanted = dataclasses.asdict(model_config(cfg, vocab_size))
    diff = [f"{k}={saved.get(k)!r} (config: {v!r})" for k, v in wanted.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"checkpoint {ckpt} holds another model shape: {', '.join(diff)}; resume "
                         "with the same model settings or use a new out_dir")


def dtype(cfg, device):
    """The training dtype: cfg.dtype, or for "auto" bf16 autocast on GPUs that have it, fp16 (with
    loss scaling) on older ones, plain fp32 on CPU and MPS."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def get_lr(step, cfg):
    """Learning rate for optimizer step `step` (0-based)."""
    # 1) linear warmup from lr/warmup to lr
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "cosine":
        # 2) cosine from lr down to min_lr at max_iters
        progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)
    # 3) wsd: stable at lr, then 4) linear decay to min_lr over the last decay_frac of the run
    decay_start = cfg.max_iters * (1 - cfg.decay_frac)
    if step < decay_start:
        return cfg.learning_rate
    progress = min(1.0, (step - decay_start) / max(1, cfg.max_iters - decay_start))
    return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)


def grad_accum_steps(cfg, world_size):
    """Micro-steps per optimizer step, so that 1 or N processes take the same global batch."""
    per_micro_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_tokens % per_micro_step:
        raise ValueError(f"total_batch_tokens={cfg.total_batch_tokens} is not a multiple of "
                         f"batch_size * block_size * world_size = {cfg.batch_size} * "
                         f"{cfg.block_size} * {world_size} = {per_micro_step}; "
                         "change total_batch_tokens or batch_size")
    return cfg.total_batch_tokens // per_micro_step


def memory_rows(cfg, mc, n_params, gpus):
    """[(what, bytes replicated, bytes per GPU under FSDP)]: weights, optimizer, activations."""
    # Activation bytes per token (bf16, flash attention; from the tensors autograd saves): per layer
    # the fp32 residual and norm inputs (~8h), q/k/v/attention output (~8h + 4kv), SwiGLU
    # gate/up/act/product (8f); then bf16 + fp32 logits and their gradient (~8V). Activation
    # checkpointing keeps only each layer's fp32 input.
    h = mc.d_model
    kv = mc.n_kv_head * mc.head_dim
    per_layer = 20 * h + 4 * kv + 8 * mc.ffn_hidden
    micro_tokens = cfg.batch_size * cfg.block_size
    act = micro_tokens * (mc.n_layer * per_layer + 8 * mc.vocab_size)
    act_ckpt = micro_tokens * (mc.n_layer * 4 * h + per_layer + 8 * mc.vocab_size)
    states = {"weights (fp32)": 4 * n_params, "gradients (fp32)": 4 * n_params,
              "AdamW moments (fp32)": 8 * n_params}
    total = sum(states.values())
    return [(name, b, b / gpus) for name, b in states.items()] + [
        (f"activations, micro-batch {cfg.batch_size}", act, act),
        ("  with act. checkpointing", act_ckpt, act_ckpt),
        ("total", total + act, total / gpus + act),
        ("total with act. ckpt", total + act_ckpt, total / gpus + act_ckpt)]


def plan(cfg):
    """Print what a run will cost before paying for it: parameters, tokens, memory per GPU, time
    and money (the preset's vocabulary: no tokenizer is read)."""
    mc = model_config(cfg, llm.model_config(cfg.model).vocab_size)
    with torch.device("meta"):   # shapes only: no memory, instant even for 1B parameters
        model = llm.LLM(mc)
    n = model.num_params()
    gpus = cfg.plan_gpus
    tokens = cfg.max_iters * cfg.total_batch_tokens
    peak = peak_flops(cfg.plan_gpu)
    if not peak:
        raise ValueError(f"plan_gpu={cfg.plan_gpu!r} is not in the peak table; use one of "
                         f"{', '.join(GPU_PEAK_FLOPS)}")
    per_token = model.flops_per_token(cfg.block_size)
    flops = per_token * tokens
    seconds = flops / (gpus * peak * cfg.plan_mfu)
    print(f"plan: {gpus} x {cfg.plan_gpu} ({peak / 1e12:.0f} TFLOP/s bf16 peak) at "
          f"{cfg.plan_mfu:.0%} MFU")
    print(f"  parameters        {n / 1e6:,.1f}M "
          f"({model.num_params(non_embedding=True) / 1e6:,.1f}M non-embedding)")
    accum = grad_accum_steps(cfg, gpus)
    print(f"  tokens per step   {cfg.total_batch_tokens:,} = {cfg.batch_size} seq x "
          f"{cfg.block_size} tokens x {gpus} GPUs x {accum} accumulation steps")
    print(f"  total tokens      {tokens / 1e9:,.2f}B in {cfg.max_iters:,} steps = "
          f"{tokens / n:.1f} tokens per param")
    print(f"  {'memory per GPU, GB':<30}{'replicated':>10}  {f'FSDP/{gpus}':>10}")
    for name, replicated, sharded in memory_rows(cfg, mc, n, gpus):
        print(f"    {name:<28}{replicated / 1e9:10.1f}  {sharded / 1e9:10.1f}")
    print("    (+ ~2 GB for the CUDA context and workspaces; activations are an estimate)")
    print(f"  compute           {flops:.2e} FLOPs ({per_token:.2e} per token)")
    print(f"  predicted time    {seconds / 3600:,.1f} h ({tokens / seconds:,.0f} tokens/s)")
    print(f"  predicted cost    ${seconds / 3600 * gpus * cfg.plan_usd_per_gpu_hour:,.0f} at "
          f"${cfg.plan_usd_per_gpu_hour}/GPU-hour")
