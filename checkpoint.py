"""kiln checkpoints and the Hugging Face Llama mapping, both directions.

    path = save_checkpoint(out_dir, step, model, optimizer, run_config, state, tokenizer)
    save_checkpoint(..., sharded=True); load_shards(ckpt, model, optimizer)  # FSDP: every process
    model, tokenizer, meta = load_model("out/demo")  # a checkpoint, a run or a Hugging Face folder
    hf_config(model.config, tokenizer), hf_state_dict(model)  # what export_hf.py writes

A checkpoint: out/<run>/ckpt_0001000/ = model.safetensors, optimizer.pt, state.pt, meta.json,
tokenizer.json, bpe.json. Under FSDP it is sharded (meta.json: "sharded": true): shards/ replaces
model.safetensors and optimizer.pt, a torch.distributed.checkpoint folder with one file of weights
and optimizer state per process and their index (.metadata, a pickle). Written into a temporary
folder and renamed, so a crash never leaves half a checkpoint.
Hugging Face names are kiln's with a "model." prefix (lm_head excepted); the RoPE layouts agree.
"""
import dataclasses
import json
import pickle
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import bpe
import common
import llm

FORMAT_VERSION = 2  # bump when the checkpoint layout changes (2: sharded checkpoints)
SHARDS = "shards"   # a sharded checkpoint's torch.distributed.checkpoint folder


def _ckpt_step(path):
    return int(path.name.split("_")[1])


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first (temporary folders never match ckpt_*)."""
    found = [p for p in Path(run_dir).glob("ckpt_*")
             if (p / "meta.json").is_file() and p.name[5:].isdigit()]
    return sorted(found, key=_ckpt_step)


def save_checkpoint(out_dir, step, model, optimizer, run_config, state, tokenizer, keep_last=3,
                    stage="pretrain", sharded=False):
    """Write out_dir/ckpt_{step:07d}/ atomically and keep only the newest keep_last checkpoints.

    model is the unwrapped LLM (never DDP/compiled); optimizer its optimizer or that one's state
    dict. sharded (FSDP): every process calls this with its FSDP-sharded model and its optimizer
    and writes only its own shards; rank 0 writes the rest and renames. state holds what resume
    needs (step, data position): tensors, numbers, strings, lists and dicts only, so it loads
    with weights_only=True. tokenizer (a bpe.Tokenizer, or None) is saved beside the weights and
    its hash recorded in meta.json.
    """
    out_dir = Path(out_dir)
    final = out_dir / f"ckpt_{step:07d}"
    tmp = out_dir / f".tmp_ckpt_{step:07d}"
    lead = not sharded or dist.get_rank() == 0   # writes all but the shards, renames, prunes
    failed = [None]
    if lead:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            for stale in out_dir.glob(".tmp_ckpt_*"):  # left by a run that was killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            failed = [f"cannot create {tmp} ({e.strerror}): free space or fix out_dir's rights"]
    if sharded:   # the others write into tmp only once rank 0 has emptied it, or stop with it
        dist.broadcast_object_list(failed, src=0)
    if failed[0]:
        raise OSError(failed[0])
    try:
        if sharded:
            _write_shards(tmp / SHARDS, model, optimizer)
            if lead:   # every shard is in rank 0's folder: out_dir must be shared by all nodes
                _shard_index(tmp / SHARDS)
        else:
            _write_whole(tmp, model, optimizer)
        if lead:
            torch.save(state, tmp / "state.pt")
            if tokenizer is not None:
                tokenizer.save(tmp)
            meta = {"format": "kiln", "version": FORMAT_VERSION, "sharded": sharded, "step": step,
                    "stage": stage, "model_config": dataclasses.asdict(model.config),
                    "run_config": run_config,
                    "tokenizer_hash": tokenizer.hash if tokenizer is not None else None,
                    "time": time.time(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
            common.write_json(tmp / "meta.json", meta)
            common.replace_dir(tmp, final)
    except BaseException:  # disk full, Ctrl-C: leave the previous checkpoints as they were
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if lead and keep_last and keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_whole(folder, model, optimizer):
    """model.safetensors and optimizer.pt, written by one process."""
    # safetensors refuses tensors that share memory: a tied lm_head is embed_tokens, saved once.
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.config.tie_embeddings)}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    opt_state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
    torch.save(opt_state, folder / "optimizer.pt")


def _write_shards(folder, model, optimizer):
    """Each process writes the shards of weights and optimizer state it holds (nothing is
    gathered) into folder/__RANK_0.distcp. dcp.save returns on every process only once all have
    written and rank 0 has written the index (.metadata): then the folder is complete."""
    import torch.distributed.checkpoint as dcp   # about 1 s to import: only where it is used
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    dcp.save({"model": get_model_state_dict(model),
              "optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)


def load_shards(ckpt, model, optimizer):
    """Resume from a sharded checkpoint: every process reads into model and optimizer only the
    part it holds (its FSDP shard; a model that is not sharded reads the whole). Under torchrun
    every process calls this; DCP reshards, so the number of processes may differ from the saving
    run's (tested: 2 FSDP processes -> 1 plain one)."""
    from torch.distributed.checkpoint import state_dict as dcp_state
    _shard_index(Path(ckpt) / SHARDS)
    state = {"model": dcp_state.get_model_state_dict(model),
             "optimizer": dcp_state.get_optimizer_state_dict(model, optimizer)}
    _dcp_load(state, Path(ckpt) / SHARDS, no_dist=not dist.is_initialized())
    dcp_state.set_model_state_dict(model, state["model"])
    dcp_state.set_optimizer_state_dict(model, optimizer, state["optimizer"])


class _IndexUnpickler(pickle.Unpickler):
    """DCP's index (.metadata) is a pickle, which torch reads with plain pickle.load: a downloaded
    checkpoint could run code. kiln reads it first with only the index's own classes, torch
    dtypes and sizes allowed, so what torch then reads is known to be plain data."""

    def find_class(self, module, name):
        allowed = (module in ("torch.distributed.checkpoint.metadata",
                              "torch.distributed.checkpoint.filesystem")
                   or (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"))
                   or (module == "pathlib" and name.endswith("Path"))
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return super().find_class(module, name)


def _safe_planner():
    """DCP's load planner, except that non-tensor values (optimizer step counts, param groups)
    must load with weights_only=True (DCP itself unpickles them freely)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)   # raises on anything but plain data
            value.seek(0)
            super().load_bytes(read_item, value)
    return Planner()


def _shard_index(folder):
    """The index (.metadata) of a sharded checkpoint, after checking that every shard file it
    names is there and long enough: a truncated file is named, not found out halfway through."""
    try:
        with open(Path(folder) / ".metadata", "rb") as f:
            index = _IndexUnpickler(f).load()
    except Exception as e:   # no .metadata, not a pickle of one, or one with code in it
        raise ValueError(_unreadable_shards(folder, e)) from None
    need = {}
    for item in index.storage_data.values():
        need[item.relative_path] = max(need.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(need.items()):
        file = Path(folder) / name
        have = file.stat().st_size if file.is_file() else None
        if have is None or have < size:
            what = "is missing" if have is None else f"is truncated ({have:,} of {size:,} bytes)"
            raise ValueError(f"{file} {what}; copy the checkpoint again or use another one")
    return index


def _dcp_load(state, folder, no_dist):
    """dcp.load, with a damaged or missing shard file as one ValueError line."""
    import torch.distributed.checkpoint as dcp
    try:
        # no_dist warns "assuming the intent is to load in a single process": it is
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=folder, no_dist=no_dist, planner=_safe_planner())
    except (Exception, dcp.CheckpointException) as e:   # the latter is a BaseException
        raise ValueError(_unreadable_shards(folder, e)) from None


def _unreadable_shards(folder, error):
    failures = getattr(error, "failures", None)   # CheckpointException: {rank: (error, trace)}
    if failures:
        error = next(iter(failures.values()))
        error = error[0] if isinstance(error, tuple) else error
    first = " ".join(str(error).split(". ")[0].split())[:160]   # not torch.load's advice to unpickle
    what = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return (f"{folder} cannot be read ({what}); a shard file is missing, truncated or corrupt: "
            "copy the checkpoint again or use another one")


def _is_hf_dir(path):
    return (path / "config.json").is_file() and any(
        (path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json"))


def find_checkpoint(path=None, stages=("sft", "pretrain"), root="out"):
    """A checkpoint or HF folder -> itself; a run folder -> its newest checkpoint; None -> the
    newest checkpoint under root/ of the first stage in stages that has one."""
    if path is None:
        found = {}
        for meta_file in Path(root).glob("*/ckpt_*/meta.json"):
            meta = json.loads(meta_file.read_text())
            found.setdefault(meta.get("stage"), []).append((meta.get("time", 0), meta_file.parent))
        for stage in stages:
            if stage in found:
                return max(found[stage])[1]
        raise FileNotFoundError(f"no {' or '.join(stages)} checkpoint under {root}/; train one "
                                "first (python train.py config/demo.py) or pass a checkpoint path")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint, run or "
                                "Hugging Face folder")
    if (path / "meta.json").is_file() or _is_hf_dir(path):
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise FileNotFoundError(f"{path} holds no checkpoint (no ckpt_XXXXXXX/ folders, no "
                                "model.safetensors); pass a checkpoint, run or Hugging Face folder")
    return ckpts[-1]


def _read_safetensors(file, device):
    try:
        return load_file(file, device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); it is probably "
                         "truncated or corrupt: copy it again or use another checkpoint") from None


def _read_shards(folder, device, tied):
    """The whole model of a sharded checkpoint, put together in this one process from every
    process's shards: no process group needed. A tied lm_head (saved as well) is left out."""
    index = _shard_index(folder).state_dict_metadata
    weights = {k: torch.empty(m.size, dtype=m.properties.dtype, device=device)
               for k, m in index.items()
               if k.startswith("model.") and not (tied and k == "model.lm_head.weight")}
    _dcp_load(weights, folder, no_dist=True)   # no_dist: also under torchrun, read it all here
    return {k.removeprefix("model."): v for k, v in weights.items()}


def read_weights(ckpt, device="cpu"):
    """The weights of a kiln checkpoint (or a run's newest) as saved, in either layout, a tied
    lm_head left out -> (tensors by name, the file or folder they came from)."""
    path = find_checkpoint(ckpt)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("sharded"):
        tied = meta["model_config"].get("tie_embeddings", False)
        return _read_shards(path / SHARDS, device, tied), path / SHARDS
    return _read_safetensors(path / "model.safetensors", device), path / "model.safetensors"


def _config_from_hf(hf, path):
    """A Hugging Face config.json -> llm.ModelConfig, refusing the variants llm.py does not
    implement."""
    if "LlamaForCausalLM" not in hf.get("architectures", []) and hf.get("model_type") != "llama":
        raise ValueError(f"{path}/config.json is not a Llama model (architectures "
                         f"{hf.get('architectures')}); kiln loads only LlamaForCausalLM")
    rope = hf.get("rope_parameters") or {}
    problems = [
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')}"),
        (hf.get("attention_bias") or hf.get("mlp_bias"), "biases"),
        (hf.get("rope_scaling") is not None or rope.get("rope_type", "default") != "default",
         "rope scaling"),
        (hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
         != hf["hidden_size"] // hf["num_attention_heads"],
         "head_dim != hidden_size / num_attention_heads"),
    ]
    for bad, what in problems:
        if bad:
            raise ValueError(f"{path} uses {what}, which kiln's llm.py does not support")
    return llm.ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads"),
        d_model=hf["hidden_size"], ffn_hidden=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf["rms_norm_eps"], max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False))


def _read_hf_weights(path, device):
    """HF names ('model.layers.0...') -> kiln names ('layers.0...'), from one file or an index of
    shards."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(_read_safetensors(path / name, device))
    return {k.removeprefix("model."): v for k, v in weights.items()}, path / files[0]


@contextmanager
def _shapes_only():
    """Modules built here are shapes on the meta device, their initial values not drawn: random
    init would cost seconds for 1B parameters, then be overwritten; and init on meta tensors goes
    through torch._refs, which imports torch._dynamo (about 1 s of every eval_mmlu.py start)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


def load_model(path=None, device="cpu"):
    """A kiln checkpoint, a run folder or a Hugging Face Llama folder -> (LLM in eval mode,
    Tokenizer or None, meta)."""
    path = find_checkpoint(path)
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        cfg = llm.model_config(meta["model_config"])
        weights, weights_file = read_weights(path, device)
    else:
        hf = json.loads((path / "config.json").read_text())
        cfg = _config_from_hf(hf, path)
        weights, weights_file = _read_hf_weights(path, device)
        meta = {"format": "hf", "step": None, "stage": "hf",
                "model_config": dataclasses.asdict(cfg), "run_config": {},
                "tokenizer_hash": None, "hf_config": hf}
    with _shapes_only():
        model = llm.LLM(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings and "embed_tokens.weight" in weights and "lm_head.weight" in want:
        # tied: saved once, under embed_tokens
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    # Compare names and shapes ourselves: load_state_dict's error is a wall of text from deep
    # inside torch.
    got = {k: tuple(v.shape) for k, v in weights.items()}
    problems = [f"{k} is missing" for k in want if k not in got]
    problems += [f"unexpected tensor {k}" for k in got if k not in want]
    problems += [f"{k} has shape {got[k]}, the config wants {want[k]}"
                 for k in want if k in got and got[k] != want[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{weights_file} does not match its model config: "
                         f"{'; '.join(problems[:3])}{more}; the checkpoint is damaged or its "
                         "config.json/meta.json belongs to another model")
    # assign: the model takes the loaded tensors (already on `device`) instead of copying into a
    # second set. As float32, like a model built normally (an HF folder may hold bf16). assign
    # unties tied weights: tie again.
    model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval()
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = bpe.Tokenizer.load(path)
        if meta.get("tokenizer_hash") and tokenizer.hash != meta["tokenizer_hash"]:
            raise ValueError(f"{path}/tokenizer.json is not the tokenizer this model was trained "
                             "with (hash differs from meta.json); copy the run's tokenizer back")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"model only {cfg.vocab_size}; they do not belong together")
    return model, tokenizer, meta


def load_trainer_state(ckpt_dir):
    """What resume needs besides the weights: {'optimizer', 'state', 'meta'} (pickle-free:
    weights_only=True); no 'optimizer' from a sharded checkpoint (load_shards reads it)."""
    path = find_checkpoint(ckpt_dir)
    meta_file = path / "meta.json"
    out = {"meta": json.loads(meta_file.read_text()) if meta_file.is_file() else {}}
    for name in ("state",) if out["meta"].get("sharded") else ("optimizer", "state"):
        file = path / f"{name}.pt"
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: {path} is not a kiln training "
                                    "checkpoint, so it cannot be resumed; start from its weights "
                                    "with --init_from=PATH instead")
        try:
            out[name] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, or a pickle that is not plain data
            raise ValueError(f"{file} cannot be loaded ({type(e).__name__}); it is truncated or "
                             "not a kiln file: resume from an earlier checkpoint") from None
    return out


def hf_config(model_config, tokenizer=None):
    """The config.json of a transformers LlamaForCausalLM with exactly this model's shapes."""
    c = model_config
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
        "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_seq_len,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta: write both.
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id if tokenizer else None,
        "eos_token_id": tokenizer.eot_id if tokenizer else None,
        "dtype": "float32", "torch_dtype": "float32", "use_cache": True,
    }


def hf_state_dict(model):
    """The model's tensors under Hugging Face Llama names; a tied lm_head is left out (HF re-ties
    it)."""
    return {name if name == "lm_head.weight" else "model." + name: tensor.contiguous()
            for name, tensor in model.state_dict().items()
            if not (name == "lm_head.weight" and model.config.tie_embeddings)}
