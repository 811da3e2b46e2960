"""Pretraining and SFT for kiln's Llama-style models: one loop, one process or many.

    python train.py config/demo.py                   # one process (CUDA, MPS or CPU): ~9M, minutes
    python train.py config/demo.py --max_iters 10    # any key: --key=value or --key value
    python train.py config/sft.py                    # SFT of the newest pretrain checkpoint in out/
    torchrun --nproc_per_node=8 train.py config/pretrain_1b.py          # DDP; --fsdp to shard
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py
    python train.py config/pretrain_1b.py --plan     # memory, time and cost; trains nothing

init_from "resume" continues out_dir after a crash or preemption (SIGTERM saves a checkpoint
first), "pretrain" starts from the newest pretraining checkpoint under out/ (SFT), PATH from it.
total_batch_tokens = batch_size * block_size * world_size * grad_accum, and grad_accum is derived,
so 1 or N processes run the same run: same data order, same losses up to float rounding.
Model keys: `model` (an llm.PRESETS name) and every llm.ModelConfig field, None = the preset's
value (vocab_size: the tokenizer's; a larger one pads the embedding). Pretraining vs SFT: tasks.py.
The host waits for the device only on log steps, every max_bad_steps steps, at evals and
checkpoints (read_due); a step with a non-finite loss or gradient is skipped on the device.
"""
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, make_dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import bpe
import checkpoint
import common
import config
import llm
import loss_eval
import optim
import parallel
import plan
import runlog
import tasks
import train_state

# Every llm.ModelConfig field is a config key, None = the preset's value: nothing to keep in sync.
ModelKeys = make_dataclass("ModelKeys", [(f.name, f.type | None, None)
                                         for f in fields(llm.ModelConfig)])


@dataclass
class TrainConfig(ModelKeys):
    model: str = "demo"                  # llm.PRESETS name; the ModelConfig keys above override
    out_dir: str = ""                    # "" -> out/<config file name>
    data_dir: str = "data/fineweb-edu"   # a data.py dir, or a mixture "data/a:0.7,data/b:0.3"
    init_from: str = "scratch"           # "scratch" | "resume" | "pretrain" | PATH (see above)
    stage: str = "pretrain"              # "pretrain" | "sft"
    max_iters: int = 1000                # optimizer steps
    eval_interval: int = 250
    eval_iters: int = 20                 # val batches (of total_batch_tokens) per source per eval
    ckpt_interval: int = 500
    log_interval: int = 10
    keep_last: int = 3                   # checkpoints kept in out_dir
    seed: int = 1337
    device: str = "auto"                 # "auto" | "cuda" | "mps" | "cpu"
    dtype: str = "auto"                  # "auto": bf16 on GPUs that have it, else fp16; fp32 on CPU
    compile: bool | None = None          # None: on for CUDA only
    batch_size: int = 8                  # micro-batch per process, in sequences
    total_batch_tokens: int = 8192       # global batch per optimizer step, in tokens
    block_size: int = 1024
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 100
    schedule: str = "cosine"             # "cosine" | "wsd" (warmup, stable, decay)
    decay_frac: float = 0.2              # wsd: the last fraction of the steps decays to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0               # 0 = no clipping (the norm is still logged)
    max_bad_steps: int = 5               # this many non-finite steps in a row stop the run
    fsdp: bool = False                   # FSDP2: shard weights, gradients, optimizer state
    activation_checkpointing: bool = False
    attention_backends: str = "flash,efficient,math"  # CUDA SDPA kernels in priority order (README)
    optimizer: str = "adamw"             # "adamw" | "muon" (hidden matrices; optim.py)
    muon_lr: float = 0.02                # muon: the hidden matrices' peak lr (optim.py: the rule)
    wandb_log: bool = False
    wandb_project: str = "kiln"
    sft_samples: int = 3                 # SFT eval: greedy answers to this many held-out prompts
    sft_max_new_tokens: int = 64
    plan: bool = False                   # --plan: print memory, time and cost, train nothing
    plan_gpus: int = 1
    plan_gpu: str = "H100"
    plan_mfu: float = 0.4
    plan_usd_per_gpu_hour: float = 2.5


# ---- Setup: small steps, called in order by setup()
def build_model(cfg, stage, tokenizer, device):
    """-> (model, checkpoint dir or None): from scratch, resumed from out_dir, or another run's
    weights (init_from "pretrain": the newest pretraining checkpoint under out/; or a PATH)."""
    if cfg.init_from == "scratch":
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        with torch.device(device):
            return llm.LLM(plan.model_config(cfg, tokenizer.vocab_size)), None
    if cfg.init_from == "resume":
        ckpts = checkpoint.list_checkpoints(cfg.out_dir)
        if not ckpts:
            raise FileNotFoundError(f"init_from=resume but {cfg.out_dir} holds no checkpoint; "
                                    "start with --init_from=scratch (or point out_dir at the run)")
        ckpt = ckpts[-1]
        if stage.shape_from_config:   # resuming pretraining with other model keys: refuse
            plan.check_shape(cfg, ckpt, tokenizer.vocab_size)
    else:
        path = None if cfg.init_from == "pretrain" else cfg.init_from
        ckpt = checkpoint.find_checkpoint(path, stages=("pretrain",))
    model, ckpt_tokenizer, _ = checkpoint.load_model(ckpt, device)
    if ckpt_tokenizer is None or ckpt_tokenizer.hash != tokenizer.hash:
        raise ValueError(f"the data in {cfg.data_dir} was tokenized with another tokenizer than "
                         f"checkpoint {ckpt}; prepare the data with the checkpoint's tokenizer "
                         f"(data.py --tokenizer {ckpt})")
    return model.train(), ckpt


@dataclass
class Run:
    """What setup() builds for the loop, which reads it and changes nothing in it."""
    cfg: TrainConfig
    stage: object            # tasks.Pretrain or tasks.SFT
    rank: int
    world: int
    device: torch.device
    grad_accum: int          # micro-steps per optimizer step on each process
    tokenizer: bpe.Tokenizer
    raw_model: llm.LLM       # saved and evaluated: never wrapped (parallel.py compiles its blocks
                             # in place, names unchanged)
    model: torch.nn.Module   # what trains: raw_model, or DDP around it
    set_grad_sync: object    # set_grad_sync(last), or None on one process
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object         # a torch.autocast, or nullcontext() in fp32
    loader: object           # the train loader: x, y, doc_ids, state = next(loader)
    log: runlog.RunLog
    start: dict              # step, bad_steps, evaluated_step: where the loop (re)starts


def setup(cfg):
    """Device, data, tokenizer, model, wrapping, optimizer, resume, log: all that can fail."""
    rank, world, device = parallel.setup_device(cfg)
    stage = tasks.STAGES[cfg.stage](cfg)
    stage.check_data()
    grad_accum = plan.grad_accum_steps(cfg, world)
    tokenizer = bpe.Tokenizer.load(tasks.data_dirs(cfg.data_dir)[0])
    raw_model, ckpt = build_model(cfg, stage, tokenizer, device)
    if cfg.block_size > raw_model.config.max_seq_len:
        raise ValueError(f"block_size={cfg.block_size} exceeds the model's max_seq_len="
                         f"{raw_model.config.max_seq_len}; lower block_size (or raise max_seq_len "
                         "from scratch)")
    loader = stage.loader(cfg.data_dir, "train", rank, world, tokenizer.vocab_size)
    dtype = plan.dtype(cfg, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)   # fp16 only
    model, set_grad_sync, use_compile = parallel.wrap_model(cfg, raw_model, dtype, device, world)
    optimizer = optim.make_optimizer(cfg, raw_model)
    start = {"step": 0, "bad_steps": 0, "evaluated_step": None}
    if cfg.init_from == "resume":
        start = train_state.resume(ckpt, raw_model, optimizer, scaler, loader)
    log = runlog.RunLog(cfg.out_dir, rank == 0, config.config_dict(cfg),
                        cfg.wandb_log and cfg.wandb_project)
    if rank == 0:
        config.print_config(cfg)
    log(msg=f"model: {raw_model.num_params() / 1e6:.2f}M parameters; {world} process(es) on "
        f"{device.type}, {dtype}, compile {use_compile}; {grad_accum} micro-steps of "
        f"{cfg.batch_size} x {cfg.block_size} tokens per process = {cfg.total_batch_tokens:,} "
        "tokens per step" + f"; resuming at step {start['step']}" * bool(start["step"]))
    stage.announce(log, loader, start["step"])
    return Run(cfg, stage, rank, world, device, grad_accum, tokenizer, raw_model, model,
               set_grad_sync, optimizer, scaler, autocast, loader, log, start)


# ---- One step: its data, its gradients, its update
def fetch(loader, n, device):
    """The next n micro-batches as (x, y, doc_ids) on device, and the loader state after them."""
    def move(t):  # pinned memory + non_blocking: on CUDA the copy overlaps the running step
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else \
            t.to(device)
    batches = []
    for _ in range(n):
        x, y, doc_ids, state = next(loader)   # pretraining rows are one stream: doc_ids None
        batches.append((move(x), move(y), None if doc_ids is None else move(doc_ids)))
    return batches, state


def train_step(model, batches, n_tokens, world_size=1, autocast=nullcontext(), scaler=None,
               set_grad_sync=None):
    """Forward and backward over one optimizer step's micro-batches [(x, y, doc_ids), ...] -> the
    step's loss: the summed cross-entropy of the learned targets (y != -1) of all micro-batches and
    processes over n_tokens (the stage's denominator, tasks.py). The gradients stay in the
    parameters for optimizer_step. DDP averages gradients over processes, hence * world_size."""
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for i, (x, y, doc_ids) in enumerate(batches):
        if set_grad_sync:
            set_grad_sync(i == len(batches) - 1)   # all-reduce gradients on the last micro-step
        with autocast:
            _, loss = model(x, y, doc_ids=doc_ids, reduction="sum")
        scaled = loss * (world_size / n_tokens)
        (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += loss.detach()
    return loss_eval.all_sum(loss_sum) / n_tokens


def gated_step(optimizer, skip):
    """optimizer.step() unless skip (a 0-d bool tensor), decided on the device. torch's fused
    optimizers (AdamW(fused=True), on CUDA, CPU and MPS) take GradScaler's found_inf flag and then
    leave the weights, both moments and the step count exactly as they were. Any other optimizer
    costs a host sync per step: skip is read."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skip.float()   # the kernels skip on exactly 1.0
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():
        optimizer.step()


def optimizer_step(run, loss):
    """Unscale and clip the gradients, and apply them unless the loss or their norm is not finite
    (then the weights and optimizer state stay exactly as they were and the batch is dropped), all
    without waiting for the device -> (grad norm, bad): 0-d tensors that read_steps reads later.

    Every process takes the same decision: the loss is summed over all processes, the norm is
    global (FSDP all-reduces its shards' norms), and fp16's found-inf too (GradScaler.unscale_ on
    FSDP2's DTensor gradients takes its max over the mesh; DDP's gradients are equal everywhere),
    so the scale stays the same on every process. In fp16, inf gradients are the scaler's business
    (it lowers the scale; the step is skipped), not a bad step."""
    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.raw_model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])   # logged even without clipping
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP: reduced once
    if run.cfg.grad_clip > 0:   # clip_grad_norm_ would rescale every gradient, by 1.0 when off
        torch.nn.utils.clip_grads_with_norm_(params, run.cfg.grad_clip, norm)
    finite_loss = torch.isfinite(loss)
    skip = ~(finite_loss & torch.isfinite(norm))
    gated_step(run.optimizer, skip)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return norm, ~finite_loss if run.scaler.is_enabled() else skip


# ---- Around the steps: eval, checkpoints, the step log, signals
def evaluate(run):
    """The stage's val metrics (tasks.py) on each source of data_dir, then its extras (SFT samples).
    eval_iters counts global batches, so 1 or N processes evaluate the same windows."""
    model = run.raw_model.eval()
    token_bytes = torch.tensor(run.tokenizer.token_bytes(), device=run.device)
    sources = {suffix: run.stage.loader(d, "val", run.rank, run.world, run.tokenizer.vocab_size,
                                        sequential=True) for suffix, d in run.stage.val.items()}
    steps = run.cfg.eval_iters * run.grad_accum
    numbers = loss_eval.evaluate_sources(model, sources, steps, token_bytes, run.autocast)
    results = {k: v for k, v in numbers.items() if k.split("/")[0] in run.stage.metrics}
    results.update(run.stage.eval_extras(model, run.tokenizer, run.autocast))
    model.train()
    return results


def log_step(run, step, lr, loss, norm, dt):
    """The step's row: speed, MFU (against the GPU's bf16 peak, where known) and peak memory.
    dt: the mean step time since the last read (read_due), the only times the host waits."""
    tok_s = run.cfg.total_batch_tokens / dt
    mfu = None
    if run.device.type == "cuda":
        peak = plan.peak_flops(torch.cuda.get_device_name(run.device))
        flops = run.raw_model.flops_per_token(run.cfg.block_size) * tok_s
        mfu = flops / (run.world * peak) if peak else None
        mem = torch.cuda.max_memory_allocated(run.device) / 1e9
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # Linux: KB
    run.log.step({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "dt_ms": dt * 1000,
                  "tokens_per_s": tok_s, "mfu": mfu, "mem_gb": mem,
                  "time": time.time() - run.log.t0}, run.cfg.max_iters,
                 eta=dt * (run.cfg.max_iters - step))


def read_due(cfg, step, bad_steps):
    """Whether the host reads the device after `step` (read_steps): on log steps, every
    max_bad_steps steps, before each eval and checkpoint (which wait for the device anyway), at the
    end, and after every step while bad steps run in a row. So a run stops at its max_bad_steps-th
    bad step in a row, as if every step were read: such a streak spans a multiple of max_bad_steps.
    Other steps never wait: their loss, grad norm and bad flag stay on the device."""
    every = (cfg.log_interval, max(1, cfg.max_bad_steps), cfg.eval_interval, cfg.ckpt_interval)
    return bad_steps > 0 or step >= cfg.max_iters or any(k and step % k == 0 for k in every)


def read_steps(run, pending, bad_steps):
    """Read pending, [(step, loss, grad norm, bad)] of the steps since the last read, in one host
    sync, and empty it: log each bad (skipped) step; max_bad_steps of them in a row stop the run
    -> (bad steps in a row, {step: (loss, grad norm)} of the good steps)."""
    rows = torch.stack([torch.stack([loss.float(), norm.float(), bad.float()])
                        for _, loss, norm, bad in pending]).tolist()
    good = {}
    for (step, *_), (loss, norm, bad) in zip(pending, rows):
        if not bad:
            bad_steps = 0
            good[step] = (loss, norm)
            continue
        bad_steps += 1
        run.log({"step": step, "skipped": f"non-finite loss {loss} or grad norm {norm}"},
                f"step {step}: skipped (loss {loss}, grad norm {norm}), {bad_steps} in a row")
        if bad_steps >= run.cfg.max_bad_steps:
            ckpts = checkpoint.list_checkpoints(run.cfg.out_dir)
            raise SystemExit(f"error: {bad_steps} non-finite steps in a row, from step "
                             f"{step - bad_steps + 1} to {step} (loss {loss}, grad norm {norm}); "
                             "stopped without saving, the last good checkpoint is "
                             f"{ckpts[-1] if ckpts else 'none'}: lower learning_rate or check the "
                             "data, then resume from it")
    pending.clear()
    return bad_steps, good


def agree_to_stop(run, stop):
    """Whether a signal arrived (stop_signals) on any process: all stop together. With several
    processes that is a vote, a host sync, taken on read steps only."""
    if run.world == 1:
        return bool(stop)
    votes = loss_eval.all_sum(torch.full((), float(bool(stop)), device=run.device))
    return votes.item() > 0


@contextmanager
def stop_signals():
    """SIGTERM/SIGINT append to the yielded list: the step in flight finishes, a checkpoint is
    saved, the run exits. A second Ctrl-C does not wait."""
    stop = []

    def on_signal(signum, _):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
    main = threading.current_thread() is threading.main_thread()   # signals arrive only there
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT) if main}
    try:
        yield stop
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def fit(run, stop):
    """Eval, checkpoint, one optimizer step; until max_iters or a signal in stop. The host waits
    for the device only after read steps (read_due): the log line, the count of bad steps and the
    vote to stop are read there. Other steps only queue work, and the next batch loads meanwhile."""
    cfg = run.cfg
    step = run.start["step"]
    bad_steps = run.start["bad_steps"]
    evaluated = run.start["evaluated_step"]   # a checkpoint saved right after an eval skips it
    data_state = run.loader.state_dict()      # the data position after the last step taken
    if step < cfg.max_iters:
        batches, batches_state = fetch(run.loader, run.grad_accum, run.device)
    pending = []   # (step, loss, grad norm, bad) since the last read: 0-d tensors on the device
    stopping = False
    while True:
        last = step >= cfg.max_iters
        eval_due = cfg.eval_interval and cfg.eval_iters and (step % cfg.eval_interval == 0 or last)
        if eval_due and run.stage.val and not stopping and step != evaluated:
            run.log.eval({"step": step, **evaluate(run)})
            evaluated = step
        periodic = cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and bad_steps == 0
        if step > run.start["step"] and (last or stopping or periodic):
            train_state.save(run, {"step": step, "data": data_state, "bad_steps": bad_steps,
                                   "scaler": run.scaler.state_dict(), "evaluated_step": evaluated})
        if last or stopping:
            return
        if not pending:   # the device is idle after a read: time the steps up to the next one
            t0 = time.time()
            t0_step = step
        lr = plan.get_lr(step, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(run.model, batches, run.stage.n_tokens(batches), run.world, run.autocast,
                          run.scaler, run.set_grad_sync)
        if step + 1 < cfg.max_iters:   # load the next step's data while the device is still busy
            upcoming = fetch(run.loader, run.grad_accum, run.device)
        norm, bad = optimizer_step(run, loss)
        step += 1
        data_state = batches_state
        if step < cfg.max_iters:
            batches, batches_state = upcoming
        pending.append((step, loss, norm, bad))
        if not (read_due(cfg, step, bad_steps) or (run.world == 1 and stop)):
            continue
        stopping = agree_to_stop(run, stop)
        bad_steps, good = read_steps(run, pending, bad_steps)
        if stopping:
            run.log(msg=f"signal {stop[0] if stop else ''} received: saving a checkpoint at step "
                    f"{step}, then exiting; continue with --init_from=resume")
        if cfg.log_interval and step % cfg.log_interval == 0 and step in good:
            log_step(run, step, lr, *good[step], dt=(time.time() - t0) / (step - t0_step))


def train(cfg):
    """Set up, run the loop, draw the loss curves -> the trained model (unwrapped)."""
    run = setup(cfg)
    with stop_signals() as stop:
        fit(run, stop)
    if run.rank == 0 and run.log.path.exists():
        try:
            runlog.plot_losses(run.log.path, Path(cfg.out_dir) / "loss.png",
                               tokens_per_step=cfg.total_batch_tokens)
        except Exception as e:   # the checkpoints are saved: a picture must not fail the run
            print(f"loss.png not drawn ({type(e).__name__}: {e})")
    return run.raw_model


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = config.parse_args(TrainConfig(), argv, doc=__doc__, config_file=True)
    if not cfg.out_dir:   # out/<config file name>, e.g. out/demo
        name = Path(argv[0]).stem if argv and not argv[0].startswith("--") else "train"
        cfg.out_dir = str(Path("out") / name)
    for key, allowed in (("stage", tuple(tasks.STAGES)), ("schedule", ("cosine", "wsd")),
                         ("dtype", ("auto", "float32", "bfloat16", "float16")),
                         ("optimizer", ("adamw", "muon"))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config key {key}={getattr(cfg, key)!r} must be one of "
                             f"{', '.join(allowed)}")
    if cfg.plan:
        return plan.plan(cfg)
    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    common.cli(main)
