"""A kiln model as one GGUF file, the format llama.cpp, Ollama and LM Studio run.

    path = write_gguf(model, tokenizer, "kiln.gguf", "q8_0")

Written with `gguf`, the Python package of llama.cpp's own repository, so the layout, the key names
and the q8_0 blocks are llama.cpp's by construction. What this file decides is the mapping:
- tensors: kiln's names -> llama.cpp's (LAYER_NAMES), and q/k rows reordered from Hugging Face's
  rotate_half RoPE to llama.cpp's interleaved one (interleave_rope);
- metadata: the model's shape under the "llama" architecture, and the tokenizer as llama.cpp's
  byte-level BPE ("gpt2"): tokens, their types, merges, the split pattern's name, BOS/EOS, whether
  BOS is added, and the chat template.
Middle floor: imports bpe (for the split pattern and kiln's chat template).
"""
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np

import bpe

Q = gguf.GGMLQuantizationType
# --gguf TYPE -> (how the 2-D weight matrices are stored, the file type llama.cpp reports). The
# 1-D tensors (RMSNorm weights) stay float32 in every type, as in llama.cpp's own converter.
TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# kiln's tensor names (Hugging Face's without "model.") -> llama.cpp's; tests/test_gguf.py checks
# them against gguf's own TensorNameMap. A tied lm_head is left out: llama.cpp then reuses
# token_embd, as transformers' GGUF loader does.
TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# The split pattern -> llama.cpp's name for it (`tokenizer.ggml.pre`; llama.cpp switches its own
# copy of the regex on this name). kiln's pattern is GPT-4's cl100k, which Llama 3 also uses:
# llama.cpp's "llama-bpe" regex is that very pattern (its contractions spelled '[sS] for (?i:'s)),
# and transformers' GGUF loader maps "llama-bpe" back to it exactly. GPT-2's own ByteLevel split
# (no Split step) is "gpt-2".
SPLITS = {bpe.SPLIT_PATTERN: "llama-bpe"}
GPT2_SPLIT = "gpt-2"


def interleave_rope(w, n_heads):
    """q or k weight (n_heads * hd, d) from Hugging Face's RoPE layout to llama.cpp's.

    Hugging Face (and kiln) rotate dimension i of each head with i + hd/2 (rotate_half); llama.cpp's
    Llama rotates neighbours 2i and 2i + 1. Moving output row i of each head's first half to 2i and
    row i of its second half to 2i + 1 makes llama.cpp rotate the same pairs; q and k move alike, so
    every q.k score is unchanged. (llama.cpp's convert_hf_to_gguf.py, LlamaModel.permute;
    transformers' GGUF loader undoes it.)"""
    rows, d = w.shape
    hd = rows // n_heads
    halves = w.reshape(n_heads, 2, hd // 2, d)                       # (heads, half, hd/2, d)
    return halves.transpose(0, 2, 1, 3).reshape(rows, d)             # (heads * hd, d)


def gguf_tensors(model):
    """(llama.cpp name, float32 array) for every tensor of the model, q and k reordered."""
    cfg = model.config
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        w = t.detach().float().cpu().numpy()
        if name in TOP_NAMES:
            yield TOP_NAMES[name], w
            continue
        layer, rest = name.removeprefix("layers.").split(".", 1)     # layers.<N>.<rest>
        if rest == "self_attn.q_proj.weight":
            w = interleave_rope(w, cfg.n_head)
        elif rest == "self_attn.k_proj.weight":
            w = interleave_rope(w, cfg.n_kv_head)
        yield f"blk.{layer}.{LAYER_NAMES[rest]}", w


def encode_tensor(w, qtype):
    """(stored array, its GGML type): matrices as qtype through gguf's quantizer, vectors float32.
    A matrix whose rows are not whole 32-value blocks cannot be q8_0: it falls back to f16, as in
    llama.cpp's converter."""
    if w.ndim == 1:
        return w.astype(np.float32), Q.F32
    try:
        return gguf.quants.quantize(w, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(w, Q.F16), Q.F16


def pre_tokenizer_name(spec):
    """The `tokenizer.ggml.pre` name for a tokenizer.json (a dict), or an error when llama.cpp
    would split text differently from this tokenizer (or it is not byte-level BPE)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = (spec.get("model", {}).get("type") == "BPE" and "ByteLevel" in kinds
                  and (spec.get("decoder") or {}).get("type") == "ByteLevel")
    if byte_level and kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex"):
        name = SPLITS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    if byte_level and kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_SPLIT
    raise ValueError("GGUF export writes byte-level BPE tokenizers split like GPT-4/Llama 3 "
                     f"(kiln's) or GPT-2; this one has pre-tokenizer {kinds} and model "
                     f"{spec.get('model', {}).get('type')}: convert its Hugging Face folder with "
                     "llama.cpp's convert_hf_to_gguf.py instead")


def vocabulary(tokenizer, vocab_size):
    """(tokens, token types, merges) as llama.cpp reads them: token i is id i, special tokens are
    CONTROL, other added tokens USER_DEFINED, and ids past the tokenizer's (the model's embedding
    may be larger) are "[PADi]" UNUSED, as llama.cpp's converter pads them."""
    spec = json.loads(tokenizer.data)
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else \
            gguf.TokenType.USER_DEFINED
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
                   for i in range(vocab_size)]
    # tokenizers writes a merge as ["a", "b"] (older files: "a b"); GGUF stores "a b"
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, token_types, merges


def template_for_engines(template):
    """The template with transformers' {% generation %} markers made plain Jinja: they only mark
    the assistant tokens for training masks, and some engines reject the unknown tag (older
    llama-cpp-python and @huggingface/jinja). `{% if true %}` keeps any whitespace control."""
    template = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)


def adds_bos(tokenizer):
    """Whether a prompt starts with BOS under the tokenizer's own rule (bpe.Tokenizer.hf: kiln's
    always, a Hugging Face folder's by its post-processor), as transformers and lm-eval encode."""
    if tokenizer.bos_id is None:
        return False
    return tokenizer.encode_hf(["a"])[0][:1] == [tokenizer.bos_id]


def check_type(kind):
    """An unknown --gguf TYPE as one clear error, before any work (export_hf.py asks before it
    loads the model)."""
    if kind not in TYPES:
        raise ValueError(f"--gguf {kind} is not a GGUF type kiln writes; use one of "
                         f"{', '.join(TYPES)}")


def write_gguf(model, tokenizer, path, kind="f16", name="kiln"):
    """Write model + tokenizer as one GGUF file at path (atomically: a temporary name, then a
    rename); returns path. The chat template is the tokenizer's own (bpe.Tokenizer.template)."""
    check_type(kind)
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer, and a GGUF file must carry one: "
                         "export a checkpoint saved with its tokenizer")
    qtype, file_type = TYPES[kind]
    cfg = model.config
    spec = json.loads(tokenizer.data)
    pre = pre_tokenizer_name(spec)   # before any work: refuse what llama.cpp would split otherwise
    tokens, token_types, merges = vocabulary(tokenizer, cfg.vocab_size)

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_type("model")
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.ffn_hidden)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.n_kv_head)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)

        writer.add_tokenizer_model("gpt2")           # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        if tokenizer.bos_id is not None:
            writer.add_bos_token_id(tokenizer.bos_id)
        if tokenizer.eot_id is not None:             # llama.cpp stops generating at EOS
            writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_add_bos_token(adds_bos(tokenizer))
        writer.add_add_eos_token(False)
        if tokenizer.template:
            writer.add_chat_template(template_for_engines(tokenizer.template))

        for tensor_name, w in gguf_tensors(model):
            data, dtype = encode_tensor(w, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
