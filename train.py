"""Pretraining and SFT for kiln's Llama-style models: one loop, one process or many.

One process (CUDA, Apple MPS or CPU, detected):
    python train.py config/demo.py                        # ~9M model on CPU, minutes
    python train.py config/sft.py                         # SFT from the newest pretrain checkpoint under out/
Eight GPUs with DDP (add --fsdp=True to shard a model that does not fit replicated):
    torchrun --nproc_per_node=8 train.py config/pretrain_1b.py
Two nodes: torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
Resume after a crash or preemption (SIGTERM saves a checkpoint first): the same command plus --init_from=resume.
Plan a run before paying for it (trains nothing): python train.py config/pretrain_1b.py --plan --plan_gpus=8

Batches: total_batch_tokens = batch_size * block_size * world_size * grad_accum, and grad_accum is derived, so
the same config on 1 or N processes is the same run: same data order, same losses up to float rounding.
"""
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

import bpe
import checkpoint
import common
import config
import data
import llm
import readers


@dataclass
class TrainConfig:
    out_dir: str = ""                    # "" -> out/<config file name>
    data_dir: str = "data/fineweb-edu"   # a data.py dir, or a weighted mixture "data/a:0.7,data/b:0.3"
    init_from: str = "scratch"           # "scratch" | "resume" (newest checkpoint in out_dir) | PATH (weights)
    task: str = "pretrain"               # "pretrain" | "sft"
    max_iters: int = 1000                # optimizer steps
    eval_interval: int = 250
    eval_iters: int = 20                 # val batches (of total_batch_tokens) per source per eval
    ckpt_interval: int = 500
    log_interval: int = 10
    keep_last: int = 3                   # checkpoints kept in out_dir
    seed: int = 1337
    device: str = "auto"                 # "auto" | "cuda" | "mps" | "cpu"
    dtype: str = "auto"                  # "auto" (bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU)
    compile: bool | None = None          # None: on for CUDA only
    batch_size: int = 8                  # micro-batch per process, in sequences
    total_batch_tokens: int = 8192       # global batch per optimizer step, in tokens
    block_size: int = 1024
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 100
    schedule: str = "cosine"             # "cosine" | "wsd" (warmup, stable, decay)
    decay_frac: float = 0.2              # wsd: the last fraction of the steps decays linearly to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0               # 0 = no clipping (the norm is still logged)
    max_bad_steps: int = 5               # this many non-finite steps in a row stop the run
    fsdp: bool = False                   # FSDP2: shard weights, gradients and optimizer state over the processes
    activation_checkpointing: bool = False
    wandb_log: bool = False
    wandb_project: str = "kiln"
    model: str = "demo"                  # llm.PRESETS name; the keys below override it (None = the preset's)
    vocab_size: int | None = None        # None: the tokenizer's; larger pads the embedding (e.g. to a multiple of 64)
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    d_model: int | None = None
    ffn_hidden: int | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None
    sft_samples: int = 3                 # SFT eval: greedy answers to this many held-out prompts
    sft_max_new_tokens: int = 64
    plan: bool = False                   # --plan: print memory, time and cost, train nothing
    plan_gpus: int = 1
    plan_gpu: str = "H100"
    plan_mfu: float = 0.4
    plan_usd_per_gpu_hour: float = 2.5



MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden", "max_seq_len", "tie_embeddings")
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; the first name contained in the device name wins.
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(gpu_name):
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k.lower() in gpu_name.lower()), None)


def get_lr(step, cfg):
    """Learning rate for optimizer step `step` (0-based): a pure function of the step and the config."""
    # 1) linear warmup from lr/warmup to lr
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "cosine":
        # 2) cosine from lr down to min_lr at max_iters
        progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)
    # 3) wsd: stable at lr, then 4) linear decay to min_lr over the last decay_frac of the run
    decay_start = cfg.max_iters * (1 - cfg.decay_frac)
    if step < decay_start:
        return cfg.learning_rate
    progress = min(1.0, (step - decay_start) / max(1, cfg.max_iters - decay_start))
    return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)


def mixture_dirs(data_dir):
    """'data/a:0.7,data/b:0.3' -> ['data/a', 'data/b']; a plain dir -> [it] (the loaders read the weights)."""
    return [d for d, _ in readers.parse_weighted(data_dir)]


def all_sum(t):
    """Sum a tensor over all processes (in place); a no-op for one process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def accumulate_grads(model, batches, world_size, autocast, scaler, set_grad_sync=lambda last: None, n_tokens=None):
    """Forward/backward over one optimizer step's micro-batches [(x, y, doc_ids), ...] -> the step's loss: the
    summed cross-entropy of every learned token (y != -1) on all micro-batches and processes over the number of
    those tokens, so batches of short SFT answers do not weigh more than long ones (as with a mean of means).
    DDP averages gradients over the processes, hence the factor world_size. Pretraining: the plain mean, and the
    caller passes n_tokens (every target counts), which saves a count and an all-reduce per step."""
    if n_tokens is None:
        n_tokens = all_sum(sum((y != -1).sum() for _, y, _ in batches).float()).clamp(min=1)
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for i, (x, y, doc_ids) in enumerate(batches):
        set_grad_sync(i == len(batches) - 1)   # all-reduce gradients only on the last micro-step
        with autocast:
            _, loss = model(x, y, doc_ids=doc_ids, reduction="sum")
        scaler.scale(loss * (world_size / n_tokens)).backward()
        loss_sum += loss.detach()
    return all_sum(loss_sum) / n_tokens


def fetch(loader, n, device):
    """The next n micro-batches as (x, y, doc_ids) on device, and the loader position right after them."""
    def move(t):  # pinned memory + non_blocking: on CUDA the copy overlaps the step that is running
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
    batches = []
    for _ in range(n):
        x, y, *doc_ids = loader.next_batch()   # pretraining rows are one stream: no doc_ids
        batches.append((move(x), move(y), move(doc_ids[0]) if doc_ids else None))
    return batches, loader.state_dict()


def setup_device(cfg):
    """-> (rank, world_size, device). torchrun sets RANK and WORLD_SIZE; without them this is one process."""
    if "RANK" not in os.environ:
        return 0, 1, common.pick_device(cfg.device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world, device


def grad_accum_steps(cfg, world_size):
    per_micro_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_tokens % per_micro_step:
        raise ValueError(f"total_batch_tokens={cfg.total_batch_tokens} is not a multiple of batch_size * block_size"
                         f" * world_size = {cfg.batch_size} * {cfg.block_size} * {world_size} = {per_micro_step}; "
                         "change total_batch_tokens or batch_size")
    return cfg.total_batch_tokens // per_micro_step


def check_data_dirs(cfg):
    """Fail before anything starts when a data dir is missing, naming the data.py command that creates it."""
    sft = cfg.task == "sft"
    if sft and "," in cfg.data_dir:
        raise ValueError(f"SFT data_dir={cfg.data_dir!r} must be one folder: mix SFT sources when preparing it "
                         "(python data.py --sft --input a.jsonl:0.7 b.jsonl:0.3 --out DIR)")
    want = "train_offsets.npy" if sft else "train_*.bin"
    for d in mixture_dirs(cfg.data_dir):
        if not list(Path(d).glob(want)):
            src = f"--source {Path(d).name}" if Path(d).name in data.PRESETS else "--input FILES"
            raise FileNotFoundError(f"data dir {d} has no {want} ({cfg.task} data); create it with "
                                    f"`python data.py {'--sft ' * sft}{src} --tokenizer data/tok --out {d}`"
                                    + " (the tokenizer the model was pretrained with)" * sft)


def make_loader(cfg, data_dir, split, rank, world, vocab_size, sequential=False):
    if cfg.task == "sft":
        return data.SFTLoader(data_dir, split, cfg.batch_size, cfg.block_size, rank, world, cfg.seed)
    return data.PretrainLoader(data_dir, split, cfg.batch_size, cfg.block_size, rank, world, cfg.seed,
                               sequential=sequential, vocab_size=vocab_size)


def model_config_from(cfg, vocab_size):
    """The preset, its overrides, and the tokenizer's vocabulary (or a padded one at least that large)."""
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
                         "leave vocab_size unset or raise it")
    overrides = {k: getattr(cfg, k) for k in MODEL_KEYS if getattr(cfg, k) is not None}
    return llm.model_config(cfg.model, **overrides, vocab_size=cfg.vocab_size or vocab_size)


def build_model(cfg, tokenizer, device):
    """-> (model, checkpoint dir or None): from scratch, resumed from out_dir, or another run's weights (PATH)."""
    if cfg.init_from == "scratch":
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        with torch.device(device):
            return llm.LLM(model_config_from(cfg, tokenizer.vocab_size)), None
    if cfg.init_from == "resume":
        ckpts = checkpoint.list_checkpoints(cfg.out_dir)
        if not ckpts:
            raise FileNotFoundError(f"init_from=resume but {cfg.out_dir} holds no checkpoint; start the run with "
                                    "--init_from=scratch (or point out_dir at the run to resume)")
        ckpt = ckpts[-1]
        if cfg.task == "pretrain":  # SFT runs take their shape from the checkpoint they started from
            saved = json.loads((ckpt / "meta.json").read_text())["model_config"]
            diff = [f"{k}={saved.get(k)!r} (config: {v!r})"
                    for k, v in asdict(model_config_from(cfg, tokenizer.vocab_size)).items() if saved.get(k) != v]
            if diff:
                raise ValueError(f"checkpoint {ckpt} holds another model shape: {', '.join(diff)}; resume with "
                                 "the same model settings or use a new out_dir")
    else:
        ckpt = checkpoint.find_checkpoint(None if cfg.init_from == "pretrain" else cfg.init_from, stages=("pretrain",))
    model, ckpt_tokenizer, _ = checkpoint.load_model(ckpt, device)
    if ckpt_tokenizer is None or ckpt_tokenizer.hash != tokenizer.hash:
        raise ValueError(f"the data in {cfg.data_dir} was tokenized with another tokenizer than checkpoint {ckpt}; "
                         f"prepare the data with the checkpoint's tokenizer (data.py --tokenizer {ckpt})")
    return model.train(), ckpt


@torch.no_grad()
def evaluate(model, cfg, tokenizer, autocast, rank, world, device, grad_accum):
    """Val loss (and bits per byte for pretraining) on each source of data_dir, summed over all processes;
    for SFT also greedy answers to the first held-out prompts (each val conversation up to its first answer).
    eval_iters counts global batches (total_batch_tokens each), so 1 or N processes evaluate the same windows."""
    model.eval()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    keys = ("val_loss", "val_bpb") if cfg.task == "pretrain" else ("val_loss",)
    results, dirs = {}, mixture_dirs(cfg.data_dir)
    for d in dirs:
        loader = make_loader(cfg, d, "val", rank, world, tokenizer.vocab_size, sequential=True)
        sums = torch.zeros(4, device=device)  # CE nats, tokens, CE nats of tokens with bytes, bytes
        for _ in range(cfg.eval_iters * grad_accum):
            x, y, doc_ids = fetch(loader, 1, device)[0][0]
            with autocast:
                logits, _ = model(x, doc_ids=doc_ids)
            y = y.flatten()
            ce = F.cross_entropy(logits.float().flatten(0, 1), y, ignore_index=-1, reduction="none")
            nbytes = token_bytes[y.clamp(min=0)] * (y != -1)
            # bpb leaves out special tokens (0 bytes, e.g. <|bos|>) as nanochat does: they encode no text.
            sums += torch.stack([ce.sum(), (y != -1).sum(), ce[nbytes > 0].sum(), nbytes.sum()])
        ce_sum, n, ce_text, nbytes = all_sum(sums).tolist()
        name = "" if len(dirs) == 1 else "/" + Path(d).name
        results[f"val_loss{name}"] = ce_sum / max(n, 1)
        if cfg.task == "pretrain":
            results[f"val_bpb{name}"] = ce_text / math.log(2) / max(nbytes, 1)
    if len(dirs) > 1:  # the mixture's own numbers: the plain mean over its sources
        for key in keys:
            results[key] = sum(v for k, v in results.items() if k.startswith(key + "/")) / len(dirs)
    if cfg.task == "sft" and cfg.sft_samples:
        results["samples"] = []
        ids, mask, offsets = (np.load(Path(cfg.data_dir) / f"val_{k}.npy", mmap_mode="r")
                              for k in ("ids", "mask", "offsets"))
        if hasattr(model, "unshard"):  # FSDP2: generate() bypasses forward(), so gather the root's weights by hand
            model.unshard()
        for c in range(min(cfg.sft_samples, len(offsets) - 1)):
            conv, learn = ids[offsets[c]:offsets[c + 1]], mask[offsets[c]:offsets[c + 1]]
            start = int(np.argmax(learn))  # the first learned token; the prompt before it ends with <|assistant|>
            n_new = min(cfg.sft_max_new_tokens, model.config.max_seq_len - start)
            if start == 0 or n_new <= 0:
                continue
            prompt = torch.tensor(conv[:start].astype(np.int64), device=device)[None]   # (1, start)
            with autocast:  # generate is a Python generator: consume it inside the block, or no step is autocast
                answer = [int(t) for t in model.generate(prompt, n_new, temperature=0, stop_ids=[tokenizer.eot_id])]
            results["samples"].append({"prompt": tokenizer.decode(conv[:start]), "answer": tokenizer.decode(answer)})
        if hasattr(model, "reshard"):
            model.reshard()
    model.train()
    return results


class RunLog:
    """Prints a message and appends a row to out_dir/log.jsonl and to wandb (when asked and installed);
    a no-op off rank 0, so the training loop has no branches for either."""
    def __init__(self, cfg, master):
        self.master, self.path, self.wandb = master, Path(cfg.out_dir) / "log.jsonl", None
        if master and cfg.wandb_log:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb_project, name=Path(cfg.out_dir).name, config=vars(cfg))
            except ImportError:
                print("wandb_log=True but wandb is not installed (pip install wandb): logging to log.jsonl only")

    def __call__(self, row=None, msg=None):
        if self.master and msg is not None:
            print(msg)
        if self.master and row is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.wandb:
                self.wandb.log(row, step=row["step"])


def plot_losses(log_path, png_path):
    """Train and val loss against step as a PNG: axes and two polylines, drawn with Pillow."""
    from PIL import Image, ImageDraw
    rows = [json.loads(line) for line in open(log_path)]
    # {step: value} keeps the last value of a step: a resumed run logs the steps after its checkpoint again
    curves = {name: [(s, v) for s, v in sorted({r["step"]: r[key] for r in rows if key in r}.items())
                     if math.isfinite(v)] for name, key in (("train", "loss"), ("val", "val_loss"))}
    points = curves["train"] + curves["val"]
    if not points:
        return
    W, H, pad = 800, 500, 60
    xs, ys = zip(*points)
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad, pad, W - pad, H - pad], outline="black")
    for xy, text in [((pad, H - pad + 8), f"step {x0}"), ((W - pad - 60, H - pad + 8), f"step {x1}"),
                     ((4, pad), f"{y1:.3f}"), ((4, H - pad - 10), f"{y0:.3f}")]:
        draw.text(xy, text, fill="black")
    for i, ((name, pts), color) in enumerate(zip(curves.items(), ("steelblue", "darkorange"))):
        pts = [(pad + (s - x0) / max(x1 - x0, 1) * (W - 2 * pad),
                H - pad - (v - y0) / max(y1 - y0, 1e-9) * (H - 2 * pad)) for s, v in pts]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=color)
        draw.text((W - pad - 80, pad + 8 + 14 * i), f"{name} loss", fill=color)
    tmp = Path(png_path).with_suffix(".tmp.png")
    img.save(tmp)
    os.replace(tmp, png_path)


def plan(cfg, mc):
    """Print what a run will cost before paying for it: parameters, tokens, memory per GPU, time and money."""
    with torch.device("meta"):   # shapes only: no memory, instant even for 1B parameters
        model = llm.LLM(mc)
    n, gpus, tokens, peak = model.num_params(), cfg.plan_gpus, cfg.max_iters * cfg.total_batch_tokens, \
        peak_flops(cfg.plan_gpu)
    if not peak:
        raise ValueError(f"plan_gpu={cfg.plan_gpu!r} is not in the peak table; use one of {', '.join(GPU_PEAK_FLOPS)}")
    # Activation bytes per token (bf16, flash attention; from the tensors autograd saves): per layer the fp32
    # residual and norm inputs (~8h), q/k/v/attention output (~8h + 4kv), SwiGLU gate/up/act/product (8f); then
    # bf16 + fp32 logits and their gradient (~8V). Activation checkpointing keeps only each layer's fp32 input.
    h, kv, f, L, V = mc.d_model, mc.n_kv_head * mc.head_dim, mc.ffn_hidden, mc.n_layer, mc.vocab_size
    per_layer, micro_tokens = 20 * h + 4 * kv + 8 * f, cfg.batch_size * cfg.block_size
    act, act_ckpt = micro_tokens * (L * per_layer + 8 * V), micro_tokens * (L * 4 * h + per_layer + 8 * V)
    states = {"weights (fp32)": 4 * n, "gradients (fp32)": 4 * n, "AdamW moments (fp32)": 8 * n}
    total, flops = sum(states.values()), model.flops_per_token(cfg.block_size) * tokens
    seconds = flops / (gpus * peak * cfg.plan_mfu)
    print(f"plan: {gpus} x {cfg.plan_gpu} ({peak / 1e12:.0f} TFLOP/s bf16 peak) at {cfg.plan_mfu:.0%} MFU")
    print(f"  parameters        {n / 1e6:,.1f}M ({model.num_params(non_embedding=True) / 1e6:,.1f}M non-embedding)")
    print(f"  tokens per step   {cfg.total_batch_tokens:,} = {cfg.batch_size} seq x {cfg.block_size} tokens x "
          f"{gpus} GPUs x {grad_accum_steps(cfg, gpus)} accumulation steps")
    print(f"  total tokens      {tokens / 1e9:,.2f}B in {cfg.max_iters:,} steps = {tokens / n:.1f} tokens per param")
    print(f"  {'memory per GPU, GB':<30}{'replicated':>10}  {f'FSDP/{gpus}':>10}")
    rows = [(name, b, b / gpus) for name, b in states.items()] + [
        (f"activations, micro-batch {cfg.batch_size}", act, act), ("  with act. checkpointing", act_ckpt, act_ckpt),
        ("total", total + act, total / gpus + act), ("total with act. ckpt", total + act_ckpt, total / gpus + act_ckpt)]
    for name, replicated, sharded in rows:
        print(f"    {name:<28}{replicated / 1e9:10.1f}  {sharded / 1e9:10.1f}")
    print("    (+ ~2 GB for the CUDA context and workspaces; activations are an estimate)")
    print(f"  compute           {flops:.2e} FLOPs ({model.flops_per_token(cfg.block_size):.2e} per token)")
    print(f"  predicted time    {seconds / 3600:,.1f} h ({tokens / seconds:,.0f} tokens/s)")
    print(f"  predicted cost    ${seconds / 3600 * gpus * cfg.plan_usd_per_gpu_hour:,.0f} at "
          f"${cfg.plan_usd_per_gpu_hour}/GPU-hour")


def train(cfg):
    rank, world, device = setup_device(cfg)
    check_data_dirs(cfg)
    grad_accum = grad_accum_steps(cfg, world)
    tokenizer = bpe.Tokenizer.load(mixture_dirs(cfg.data_dir)[0])
    raw_model, ckpt = build_model(cfg, tokenizer, device)   # saved and evaluated: never wrapped, never compiled
    if cfg.block_size > raw_model.config.max_seq_len:
        raise ValueError(f"block_size={cfg.block_size} exceeds the model's max_seq_len="
                         f"{raw_model.config.max_seq_len}; lower block_size (or raise max_seq_len from scratch)")
    loader = make_loader(cfg, cfg.data_dir, "train", rank, world, tokenizer.vocab_size)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else torch.float32 if device.type != "cuda" else \
        torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)   # fp16 needs loss scaling
    if cfg.activation_checkpointing:   # keep only each block's input; recompute the rest during backward
        for block in raw_model.layers:
            block.forward = partial(recompute, block.forward, use_reentrant=False)
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in raw_model.layers:   # one all-gather per block, overlapped with the previous block's compute
            fully_shard(block, mp_policy=mp)
        fully_shard(raw_model, mp_policy=mp)
    # AdamW; weight decay only on matrices (dim >= 2): never on norm gains. Fused kernel on CUDA only.
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")
    start_step, bad_steps, evaluated = 0, 0, None   # evaluated: the step of the last eval (skip it on resume)
    if cfg.init_from == "resume":
        saved = checkpoint.load_trainer_state(ckpt)
        set_optimizer_state_dict(raw_model, optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        state = saved["state"]
        start_step, bad_steps = state["step"], state["bad_steps"]
        evaluated = state.get("evaluated_step")
        loader.load_state_dict(state["data"])
        scaler.load_state_dict(state["scaler"])
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    model = torch.compile(raw_model) if use_compile else raw_model   # compile before wrapping in DDP
    set_grad_sync = lambda last: None   # FSDP and DDP: reduce gradients only on the last micro-step
    if cfg.fsdp:
        set_grad_sync = raw_model.set_requires_gradient_sync
    elif world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        set_grad_sync = lambda last: setattr(model, "require_backward_grad_sync", last)

    master = rank == 0
    log = RunLog(cfg, master)
    if master:
        config.print_config(cfg)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        common.write_json(Path(cfg.out_dir) / "config.json", config.config_dict(cfg))
    log(msg=f"model: {raw_model.num_params() / 1e6:.2f}M parameters; {world} process(es) on {device.type}, {dtype}, "
        f"compile {use_compile}; {grad_accum} micro-steps of {cfg.batch_size} x {cfg.block_size} tokens per process"
        f" = {cfg.total_batch_tokens:,} tokens per step" + f"; resuming at step {start_step}" * bool(start_step))
    if cfg.task == "sft":
        meta = json.loads((Path(cfg.data_dir) / "meta.json").read_text())
        decon = meta.get("decontamination", {})
        log({"step": start_step, "decontaminated": decon.get("removed", 0), "too_long": loader.too_long},
            f"SFT data: {meta.get('train_conversations')} train / {meta.get('val_conversations')} val "
            f"conversations; {loader.too_long} train conversations longer than block_size + 1 skipped; "
            f"{decon.get('removed', 0)} removed for 13-gram overlap with MMLU test "
            f"({decon.get('mmlu_dir') or 'no MMLU folder: not checked'}); record counts {meta.get('counts')}")
    flops_per_token = raw_model.flops_per_token(cfg.block_size)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    stop = []   # SIGTERM/SIGINT: the step in flight finishes, a checkpoint is saved, the run exits

    def on_signal(signum, _):
        if stop:   # a second Ctrl-C: do not wait
            raise KeyboardInterrupt
        stop.append(signum)
    handlers = {}
    if threading.current_thread() is threading.main_thread():   # Python delivers signals only there
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        step, done_state, ema_dt, t_start, stopping = start_step, loader.state_dict(), None, time.time(), False
        batches, batches_state = fetch(loader, grad_accum, device) if step < cfg.max_iters else (None, None)
        while True:
            last = step >= cfg.max_iters
            if (cfg.eval_interval and cfg.eval_iters and (step % cfg.eval_interval == 0 or last) and not stopping
                    and step != evaluated):   # a checkpoint written right after an eval resumes past it
                row = {"step": step, **evaluate(raw_model, cfg, tokenizer, autocast, rank, world, device, grad_accum)}
                evaluated = step
                log(row, f"eval step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                            if isinstance(v, float))
                    + "".join(f"\n  prompt: {s['prompt'][-200:]!r}\n  answer: {s['answer']!r}"
                              for s in row.get("samples", [])))
            periodic = cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and bad_steps == 0   # not mid-trouble
            if step > start_step and (last or stopping or periodic):
                # All processes take part (FSDP gathers full tensors); rank 0 writes. The old checkpoints stay
                # valid until the new one is complete (save_checkpoint writes a temporary folder, then renames).
                full = StateDictOptions(full_state_dict=True, cpu_offload=True)
                model_state = get_model_state_dict(raw_model, options=full) if cfg.fsdp else None
                opt_state = get_optimizer_state_dict(raw_model, optimizer, options=full)
                if master:
                    # No RNG state: training draws no random numbers (seeded data order, no dropout, greedy
                    # samples); the resume tests check that bitwise.
                    state = {"step": step, "data": done_state, "scaler": scaler.state_dict(),
                             "bad_steps": bad_steps, "evaluated_step": evaluated}
                    path = checkpoint.save_checkpoint(cfg.out_dir, step, raw_model, opt_state, config.config_dict(cfg),
                                                  state, tokenizer, keep_last=cfg.keep_last, stage=cfg.task,
                                                  model_state=model_state)
                    print(f"saved {path}")
                if dist.is_initialized():
                    dist.barrier()
            if last or stopping:
                break
            # ---- one optimizer step
            t0 = time.time()
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = accumulate_grads(model, batches, world, autocast, scaler, set_grad_sync,
                                    n_tokens=None if cfg.task == "sft" else float(cfg.total_batch_tokens))
            # load the next step's data while the device is still busy
            next_batches = fetch(loader, grad_accum, device) if step + 1 < cfg.max_iters else (None, None)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP: a DTensor
            loss, norm = loss.item(), norm.item()
            if math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled()):   # fp16: the scaler skips infs
                scaler.step(optimizer)
                bad_steps = 0
            else:   # skip: no update, the batch is dropped
                bad_steps += 1
                log({"step": step + 1, "skipped": f"non-finite loss {loss} or grad norm {norm}"},
                    f"step {step + 1}: skipped (loss {loss}, grad norm {norm}), {bad_steps} in a row")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done_state = batches_state
            batches, batches_state = next_batches
            if bad_steps >= cfg.max_bad_steps:
                last_ckpt = checkpoint.list_checkpoints(cfg.out_dir)
                raise SystemExit(f"error: {bad_steps} non-finite steps in a row (loss {loss}, grad norm {norm}) at "
                                 f"step {step}; stopped without saving, the last good checkpoint is "
                                 f"{last_ckpt[-1] if last_ckpt else 'none'}: lower learning_rate or check the data, "
                                 "then resume from it")
            stopping = bool(stop) if world == 1 else \
                all_sum(torch.tensor(float(bool(stop)), device=device)).item() > 0   # all ranks stop together
            if stopping:
                log(msg=f"signal {stop[0] if stop else ''} received: saving a checkpoint at step {step}, then "
                    "exiting; continue with --init_from=resume")
            # ---- logging
            dt = time.time() - t0
            ema_dt = dt if ema_dt is None or step == start_step + 2 else 0.9 * ema_dt + 0.1 * dt   # skip warm-up
            if cfg.log_interval and step % cfg.log_interval == 0 and math.isfinite(loss):
                tok_s = cfg.total_batch_tokens / dt
                mfu = flops_per_token * tok_s / (world * peak) if peak else None
                mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else \
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # Linux: KB
                eta = ema_dt * (cfg.max_iters - step)
                log({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "dt_ms": dt * 1000,
                     "tokens_per_s": tok_s, "mfu": mfu, "mem_gb": mem, "time": time.time() - t_start},
                    f"step {step}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                    f"{dt * 1000:.0f} ms | {tok_s:,.0f} tok/s | MFU {f'{mfu:.1%}' if mfu else '-'} | "
                    f"mem {mem:.2f} GB | eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if master and log.path.exists():
        plot_losses(log.path, Path(cfg.out_dir) / "loss.png")
    return raw_model


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = config.parse_args(TrainConfig(), argv, doc=__doc__, config_file=True)
    if not cfg.out_dir:   # out/<config file name>, e.g. out/demo
        name = Path(argv[0]).stem if argv and not argv[0].startswith("--") else "train"
        cfg.out_dir = str(Path("out") / name)
    for key, allowed in (("task", ("pretrain", "sft")), ("schedule", ("cosine", "wsd")),
                         ("dtype", ("auto", "float32", "bfloat16", "float16"))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config key {key}={getattr(cfg, key)!r} must be one of {', '.join(allowed)}")
    if cfg.plan:
        return plan(cfg, model_config_from(cfg, llm.model_config(cfg.model).vocab_size))
    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    common.cli(main)
