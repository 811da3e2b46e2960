"""Export a kiln checkpoint as a Hugging Face Llama folder that transformers loads with no custom
code.

    python export_hf.py out/demo hf/demo             # a run folder: its newest checkpoint
    python export_hf.py out/sft/ckpt_0002000 hf/sft  # one checkpoint
    python export_hf.py hf/demo                      # the newest sft (else pretrain) checkpoint
    python export_hf.py --ckpt out/demo --out hf/demo  # the first line, as options
    python export_hf.py out/demo kiln.gguf --gguf q8_0  # one GGUF file: f32, f16, bf16 or q8_0

Then, in Python:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/demo")
    tok = AutoTokenizer.from_pretrained("hf/demo")

Writes config.json (LlamaForCausalLM), generation_config.json, model.safetensors and, when the
checkpoint has a tokenizer, tokenizer.json + tokenizer_config.json (with the chat template) +
special_tokens_map.json. kiln's tensor names are HF's minus the "model." prefix, and its RoPE is
HF's rotate_half: no permutation.

With --gguf TYPE, OUT is one GGUF file for llama.cpp, Ollama and LM Studio instead (gguf_export.py):
the weights (matrices as TYPE, norms float32), the tokenizer and the chat template, e.g.
    llama-cli -m kiln.gguf                       # llama.cpp: a chat in the file's own template
"""
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

import checkpoint
import common
import config
import gguf_export


def export(ckpt, out_dir):
    """Write the Hugging Face folder out_dir from a kiln checkpoint (or run folder); returns
    out_dir."""
    out_dir = Path(out_dir)
    src = checkpoint.find_checkpoint(ckpt)
    if out_dir.resolve() == src.resolve():
        raise ValueError(f"{out_dir} is the checkpoint itself; pick a new output folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        old = out_dir / "config.json"
        # never wipe a run folder: only an earlier export's config.json names architectures
        if not (old.is_file() and "architectures" in json.loads(old.read_text())):
            raise ValueError(f"{out_dir} exists and is not an earlier export; pick a new output "
                             "folder")
    model, tokenizer, meta = checkpoint.load_model(src)
    cfg = model.config
    print(f"exporting {src} (step {meta.get('step')}, {model.num_params():,} parameters) "
          f"-> {out_dir}")

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf = checkpoint.hf_config(cfg, tokenizer)
        common.write_json(tmp / "config.json", hf)
        generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"],
                      "pad_token_id": hf["eos_token_id"]}
        common.write_json(tmp / "generation_config.json", generation)
        weights = checkpoint.hf_state_dict(model)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_hf(tmp, model_max_length=cfg.max_seq_len)  # with the chat template
        common.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_gguf(ckpt, out_file, kind):
    """Write one GGUF file from a kiln checkpoint, run folder or Hugging Face folder; returns
    out_file."""
    gguf_export.check_type(kind)  # before loading a model that cannot be written
    src = checkpoint.find_checkpoint(ckpt)
    model, tokenizer, meta = checkpoint.load_model(src)
    print(f"exporting {src} (step {meta.get('step')}, {model.num_params():,} parameters) "
          f"-> {out_file} ({kind})")
    run = src.parent if src.name.startswith("ckpt_") else src
    return gguf_export.write_gguf(model, tokenizer, out_file, kind, name=run.resolve().name)


@dataclass
class Args:
    ckpt: str | None = None  # checkpoint or run folder (default: the newest sft, else pretrain)
    out: str | None = None   # the Hugging Face folder to write (with --gguf: the .gguf file)
    gguf: str | None = None  # f32, f16, bf16 or q8_0: write OUT as one GGUF file for llama.cpp


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = config.parse_args(Args(), argv, doc=__doc__, positional=("ckpt", "out"))
    if args.out is None:  # one free argument is OUT_DIR: the checkpoint defaults to the newest
        args = config.parse_args(Args(), argv, doc=__doc__, positional=("out",))
    if args.out is None:
        raise ValueError("no output folder: usage: python export_hf.py [CKPT_OR_RUN_DIR] OUT_DIR")
    if args.gguf is not None:
        export_gguf(args.ckpt, args.out, args.gguf)
        print(f"wrote {args.out}: `llama-cli -m {args.out}` runs it (Ollama: `FROM {args.out}` in "
              "a Modelfile)")
        return
    if args.out.endswith(".gguf"):
        raise ValueError(f"{args.out} names a GGUF file: add --gguf TYPE (f32, f16, bf16 or q8_0), "
                         "or name a folder for the Hugging Face export")
    export(args.ckpt, args.out)
    print(f"wrote {args.out}: AutoModelForCausalLM.from_pretrained({args.out!r}) loads it")


if __name__ == "__main__":
    common.cli(main)
