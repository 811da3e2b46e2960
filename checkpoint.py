"""kiln checkpoints and the Hugging Face Llama mapping, both directions.

    path = save_checkpoint(out_dir, step, model, optimizer, run_config, state, tokenizer)
    model, tokenizer, meta = load_model("out/demo")  # a checkpoint, a run or a Hugging Face folder
    hf_config(model.config, tokenizer), hf_state_dict(model)  # what export_hf.py writes

A checkpoint: out/<run>/ckpt_0001000/ = model.safetensors, optimizer.pt, state.pt, meta.json,
tokenizer.json, bpe.json. Written into a temporary folder and renamed, so a crash never leaves half
a checkpoint.
Hugging Face names are kiln's with a "model." prefix (lm_head excepted); the RoPE layouts agree.
"""
import dataclasses
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import bpe
import common
import llm

FORMAT_VERSION = 1  # bump when the checkpoint layout changes


def _ckpt_step(path):
    return int(path.name.split("_")[1])


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first (temporary folders never match ckpt_*)."""
    found = [p for p in Path(run_dir).glob("ckpt_*")
             if (p / "meta.json").is_file() and p.name[5:].isdigit()]
    return sorted(found, key=_ckpt_step)


def save_checkpoint(out_dir, step, model, optimizer, run_config, state, tokenizer, keep_last=3,
                    stage="pretrain", model_state=None):
    """Write out_dir/ckpt_{step:07d}/ atomically and keep only the newest keep_last checkpoints.

    model is the unwrapped LLM (never DDP/compiled). Under FSDP pass its gathered full state dict
    as model_state and the optimizer's full state dict as optimizer. state holds what resume needs
    (step, data position): tensors, numbers, strings, lists and dicts only, so it loads with
    weights_only=True. tokenizer (a bpe.Tokenizer, or None) is saved beside the weights and its
    hash recorded in meta.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"ckpt_{step:07d}"
    for stale in out_dir.glob(".tmp_ckpt_*"):  # left by a run that was killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f".tmp_ckpt_{step:07d}"
    tmp.mkdir()
    try:
        cfg = model.config
        weights = model_state if model_state is not None else model.state_dict()
        # safetensors refuses tensors that share memory: a tied lm_head is embed_tokens, saved once.
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()
                   if not (k == "lm_head.weight" and cfg.tie_embeddings)}
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        opt_state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        torch.save(opt_state, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {"format": "kiln", "version": FORMAT_VERSION, "step": step, "stage": stage,
                "model_config": dataclasses.asdict(cfg), "run_config": run_config,
                "tokenizer_hash": tokenizer.hash if tokenizer is not None else None,
                "time": time.time(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        common.write_json(tmp / "meta.json", meta)
        common.replace_dir(tmp, final)
    except BaseException:  # disk full, Ctrl-C: leave the previous checkpoints as they were
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last and keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
        weights_file = path / "model.safetensors"
        weights = _read_safetensors(weights_file, device)
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
    weights_only=True)."""
    path = find_checkpoint(ckpt_dir)
    meta_file = path / "meta.json"
    out = {"meta": json.loads(meta_file.read_text()) if meta_file.is_file() else {}}
    for name in ("optimizer", "state"):
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
