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


# HBM bandwidth (bytes/s) by the vendors' datasheets, for the decode limit of bench/gpu_check.py:
# batch-1 decode reads every weight once per token. The first name contained in the device name
# wins, as in GPU_PEAK_FLOPS.
GPU_HBM_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12,
                     "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12,
                     "A100-PCIE-80GB": 1.935e12, "A100": 2.039e12}


def hbm_bandwidth(gpu_name):
    """The memory bandwidth of a GPU by name, or None for one not in the table."""
    return next((v for k, v in GPU_HBM_BANDWIDTH.items() if k.lower() in gpu_name.lower()), None)


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


def activation_bytes_per_token(mc, compiled):
    """Bytes that autograd keeps from forward to backward per token in each block, under bf16
    autocast with SDPA's O(T) attention (flash-style: output and log-sum-exp, no T x T matrix), as
    measured with saved-tensor hooks on one block (tests/test_plan.py). The bf16 weight copies are
    not per token: see memory_rows."""
    h = mc.d_model
    kv = mc.n_kv_head * mc.head_dim
    f = mc.ffn_hidden
    # Both modes: the bf16 q|k|v projections 2(h + 2kv) (v is a view of them), rotated q and k
    # 2(h + kv), SDPA's output 2h and fp32 log-sum-exp 4 * n_head, rotary cos/sin in bf16
    # 2 * 2 * head_dim, the two norms' fp32 1/rms 2 * 4.
    common = 2 * (h + 2 * kv) + 2 * (h + kv) + 2 * h + 4 * mc.n_head + 4 * mc.head_dim + 8
    if compiled:
        # inductor's partitioner recomputes the norms, casts and silu in backward and keeps: the
        # fp32 block input 4h, the bf16 normed inputs of attention and MLP 2 * 2h, one more bf16
        # (B, T, d_model) tensor 2h, SwiGLU's gate, up and product 3 * 2f.
        return common + 10 * h + 6 * f
    # eager: fp32 block input, first norm's output, residual, second norm's output 4 * 4h; autocast
    # casts the normed input to bf16 once per projection (q, k, v, gate, up) 5 * 2h; SwiGLU's gate,
    # silu(gate), up and product 4 * 2f.
    return common + 26 * h + 8 * f


def loss_tail_bytes(mc, tokens):
    """The final norm and llm.LLM.loss (llm.ChunkedCrossEntropy, which makes the gradients in
    forward) -> (bytes kept for backward, bytes alive only while the loss runs, at the end of
    forward). Kept: the norm's fp32 input and output and the fp32 gradient for h (12h per token),
    the fp32 gradient for lm_head (4Vh). While it runs: bf16 copies of h and lm_head, the update
    of lm_head's gradient (a bf16 product, its fp32 copy and the new sum: 10Vh), and one chunk of
    llm.LOSS_CHUNK positions' logits: bf16, fp32 (the softmax reuses them) and bf16 gradient (8V)."""
    h = mc.d_model
    V = mc.vocab_size
    kept = tokens * 12 * h + 4 * V * h
    running = tokens * 2 * h + 12 * V * h + min(tokens, llm.LOSS_CHUNK) * 8 * V
    return kept, running


# parallel.wrap_model's DDP call: without gradient_as_bucket_view DDP keeps its all-reduce buckets
# as a second fp32 copy of every gradient (tests/test_plan.py checks the two agree).
DDP_GRADIENT_AS_BUCKET_VIEW = False


def optimizer_bytes(cfg, model):
    """AdamW: two fp32 moments per parameter; Muon (optim.py): one fp32 momentum per hidden matrix,
    AdamW's two for the rest."""
    n = model.num_params()
    if cfg.optimizer != "muon":
        return 8 * n
    hidden = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)
    return 4 * hidden + 8 * (n - hidden)


def memory_rows(cfg, model, gpus, compiled):
    """[(what, bytes per GPU replicated (one GPU or DDP), bytes per GPU under FSDP)], the totals
    last; compiled: torch.compile'd blocks, else eager."""
    mc = model.config
    n = model.num_params()
    block_matrices = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
    micro_tokens = cfg.batch_size * cfg.block_size
    states = [("weights (fp32)", 4 * n), ("gradients (fp32)", 4 * n),
              (f"{cfg.optimizer} state (fp32)", optimizer_bytes(cfg, model))]
    rows = [(name, b, b / gpus) for name, b in states]
    # DDP's buckets exist from the start with more than one GPU; FSDP2 accumulates unsharded fp32
    # gradients (its reduce_dtype) on micro-steps that skip the reduce-scatter (grad_accum > 1).
    buckets = 4 * n if gpus > 1 and not DDP_GRADIENT_AS_BUCKET_VIEW else 0
    fsdp_accum = 4 * n if grad_accum_steps(cfg, gpus) > 1 else 0
    rows.append(("grad buckets / FSDP accumulation", buckets, fsdp_accum))
    # Autocast's bf16 copies of the block matrices are saved for backward (lm_head's lives only
    # while the loss runs: loss_tail_bytes); FSDP2 gathers bf16 weights instead: two blocks (one prefetched) and the root's
    # embedding, norm and lm_head. Under checkpointing a block's copies live while it recomputes.
    root = n - mc.n_layer * sum(p.numel() for p in model.layers[0].parameters())
    copies = (2 * mc.n_layer * block_matrices, 2 * (2 * block_matrices + root))
    copies_ckpt = (2 * block_matrices, copies[1])
    per_layer = micro_tokens * activation_bytes_per_token(mc, compiled)
    loss = sum(loss_tail_bytes(mc, micro_tokens))
    act = mc.n_layer * per_layer + loss
    # checkpointing keeps each block's fp32 input; backward recomputes one block at a time
    act_ckpt = micro_tokens * mc.n_layer * 4 * mc.d_model + per_layer + loss
    rows += [("bf16 weight copies", *copies), ("  with act. checkpointing", *copies_ckpt),
             (f"activations, micro-batch {cfg.batch_size}", act, act),
             ("  with act. checkpointing", act_ckpt, act_ckpt)]
    fixed = [sum(r[i] for r in rows[:4]) for i in (1, 2)]   # weights to buckets, per column
    return rows + [("total", *(fixed[i] + copies[i] + act for i in (0, 1))),
                   ("total with act. ckpt",
                    *(fixed[i] + copies_ckpt[i] + act_ckpt for i in (0, 1)))]


def predicted_peak(cfg, model, gpus=1, compiled=True):
    """The total memory_rows predicts for cfg's own mode (fsdp, activation_checkpointing)."""
    totals = memory_rows(cfg, model, gpus, compiled)[-2:]
    return totals[int(bool(cfg.activation_checkpointing))][2 if cfg.fsdp else 1]


def print_memory(cfg, model, gpus):
    """The memory table, one column replicated (1 GPU or DDP) and one FSDP, and what it assumed."""
    compiled = cfg.compile is not False   # None: compiled on CUDA, which a plan is for
    replicated = "1 GPU" if gpus == 1 else f"DDP/{gpus}"
    print(f"  {'memory per GPU, GB':<38}{replicated:>8}  {f'FSDP/{gpus}':>8}")
    for name, rep, sharded in memory_rows(cfg, model, gpus, compiled):
        print(f"    {name:<36}{rep / 1e9:8.1f}  {sharded / 1e9:8.1f}")
    per_token = {c: activation_bytes_per_token(model.config, c) / 1e3 for c in (True, False)}
    mode = {True: "compiled", False: "eager"}
    run = ("FSDP" if cfg.fsdp else replicated) + " + act. ckpt" * bool(cfg.activation_checkpointing)
    print(f"    assumed: bf16 autocast, {mode[compiled]} blocks ({per_token[compiled]:.0f} KB per "
          f"token per layer; {mode[not compiled]}: {per_token[not compiled]:.0f} KB),")
    print(f"      flash-style attention, loss in chunks of {llm.LOSS_CHUNK} tokens, DDP "
          f"gradient_as_bucket_view={DDP_GRADIENT_AS_BUCKET_VIEW}")
    print(f"    this config runs: {run}")
    print("    (+ ~2 GB for the CUDA context and workspaces; activations are an estimate)")


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
    print_memory(cfg, model, gpus)
    print(f"  compute           {flops:.2e} FLOPs ({per_token:.2e} per token)")
    print(f"  predicted time    {seconds / 3600:,.1f} h ({tokens / seconds:,.0f} tokens/s)")
    print(f"  predicted cost    ${seconds / 3600 * gpus * cfg.plan_usd_per_gpu_hour:,.0f} at "
          f"${cfg.plan_usd_per_gpu_hour}/GPU-hour")
