"""A training checkpoint from a running job and back: the weights, the optimizer state and where
the loop stands, under one process, DDP or FSDP. The files themselves are checkpoint.py's.

    save(run, state)          # every process calls it; rank 0 writes
    start = resume(ckpt, raw_model, optimizer, scaler, loader)
"""
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp

import checkpoint
import config


def resume(ckpt, raw_model, optimizer, scaler, loader):
    """Load the optimizer, scaler and data position of checkpoint ckpt -> where the loop resumes."""
    saved = checkpoint.load_trainer_state(ckpt)
    dcp.set_optimizer_state_dict(raw_model, optimizer, saved["optimizer"],
                                 options=dcp.StateDictOptions(full_state_dict=True))
    state = saved["state"]
    loader.load_state_dict(state["data"])
    scaler.load_state_dict(state["scaler"])
    return {k: state.get(k) for k in ("step", "bad_steps", "evaluated_step")}


def save(run, state):
    """A checkpoint of the step in state: all processes take part (FSDP gathers), rank 0 writes.
    No RNG state: training draws no random numbers (seeded data order, no dropout, greedy)."""
    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = dcp.get_model_state_dict(run.raw_model, options=full) if run.cfg.fsdp else None
    opt_state = dcp.get_optimizer_state_dict(run.raw_model, run.optimizer, options=full)
    if run.rank == 0:
        path = checkpoint.save_checkpoint(run.cfg.out_dir, state["step"], run.raw_model, opt_state,
                                          config.config_dict(run.cfg), state, run.tokenizer,
                                          keep_last=run.cfg.keep_last, stage=run.stage.name,
                                          model_state=model_state)
        print(f"saved {path}")
    if dist.is_initialized():
        dist.barrier()
