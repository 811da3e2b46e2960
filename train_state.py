"""A training checkpoint from a running job and back: the weights, the optimizer state and where
the loop stands, under one process, DDP or FSDP. The files themselves are checkpoint.py's.

    save(run, state)          # every process calls it
    start = resume(ckpt, raw_model, optimizer, scaler, loader)

Under FSDP each process writes and reads only its own shard of the weights and optimizer state
(checkpoint.py's sharded layout): nothing is gathered onto one process. The loop state (step, data
position, loss scale) is the same on every process, so rank 0 writes it once: the loaders count
windows globally (loader.py), and the fp16 loss scale moves alike wherever the processes agree on
skipping a step (DDP: gradients are all-reduced before the scaler looks at them).
"""
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp

import checkpoint
import config
import plan


def resume(ckpt, raw_model, optimizer, scaler, loader):
    """Load the optimizer, scaler and data position of checkpoint ckpt -> where the loop resumes.
    A sharded checkpoint also reloads the weights, each process its shard."""
    saved = checkpoint.load_trainer_state(ckpt)
    before = saved["meta"].get("run_config", {}).get("optimizer", "adamw")
    now = optimizer_name(optimizer)
    if before != now:   # their states have other keys: DCP would call the checkpoint corrupt
        raise ValueError(f"{ckpt} holds {before} optimizer state but this run uses {now}; resume "
                         f"with --optimizer={before}, or start from its weights with "
                         f"--init_from={ckpt}")
    if saved["meta"].get("sharded"):
        checkpoint.load_shards(ckpt, raw_model, optimizer)
    else:
        dcp.set_optimizer_state_dict(raw_model, optimizer, saved["optimizer"],
                                     options=dcp.StateDictOptions(full_state_dict=True))
    state = saved["state"]
    loader.load_state_dict(state["data"])
    load_scaler(scaler, state, ckpt)
    return {k: state.get(k) for k in ("step", "bad_steps", "evaluated_step")}


def optimizer_name(optimizer):
    """ "adamw" or "muon": what TrainConfig.optimizer named, read from the optimizer itself."""
    return "adamw" if isinstance(optimizer, torch.optim.AdamW) else "muon"


def load_scaler(scaler, state, ckpt):
    """The fp16 loss scale, also when the checkpoint's dtype differs from this run's. Resuming in
    another dtype works: weights and optimizer state are float32 in every mode (autocast changes
    only the compute), so only the loss scale is missing or left over. A missing one starts where
    every fp16 run starts, and finds its level in a few skipped steps."""
    saved_dtype = state.get("dtype", "bfloat16 or float32")   # older checkpoints did not say
    if scaler.is_enabled() and not state["scaler"]:
        _say(f"{ckpt} was trained in {saved_dtype} without loss scaling: this float16 run starts "
             f"a fresh loss scale of {scaler.get_scale():g}, as a new float16 run does (its first "
             "steps may be skipped while the scale settles)")
    elif not scaler.is_enabled() and state["scaler"]:
        _say(f"{ckpt} was trained in float16: its loss scale is dropped, this run needs none")
    else:
        scaler.load_state_dict(state["scaler"])


def _say(msg):
    if not dist.is_initialized() or dist.get_rank() == 0:   # once, not once per process
        print(msg)


def save(run, state):
    """A checkpoint of the step in state; every process calls it. FSDP: each process writes its
    shards, rank 0 the rest; else rank 0 writes it all. No RNG state: training draws no random
    numbers (seeded data order, no dropout, greedy)."""
    state = {**state, "dtype": str(plan.dtype(run.cfg, run.device)).removeprefix("torch.")}
    optimizer = run.optimizer
    if not run.cfg.fsdp:   # keyed by parameter name, like the model's state dict
        full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = dcp.get_optimizer_state_dict(run.raw_model, run.optimizer, options=full)
    if run.cfg.fsdp or run.rank == 0:
        path = checkpoint.save_checkpoint(run.cfg.out_dir, state["step"], run.raw_model, optimizer,
                                          config.config_dict(run.cfg), state, run.tokenizer,
                                          keep_last=run.cfg.keep_last, stage=run.stage.name,
                                          sharded=run.cfg.fsdp)
    if run.rank == 0:
        print(f"saved {path}")
    if dist.is_initialized():
        dist.barrier()   # no process runs ahead (or exits) before the checkpoint is complete
