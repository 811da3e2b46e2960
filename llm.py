"""A Llama-style decoder: pre-norm RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, no biases.

One file, read top to bottom: config and presets, the building blocks, the model, the KV cache and generation.
Parameter names are Hugging Face Llama's without the "model." prefix, so export/import is one line per tensor.

    from llm import LLM, model_config
    model = LLM(model_config("tiny"))
    logits, loss = model(idx, targets)                  # idx, targets: (B, T) LongTensors
    for tok in model.generate(idx, 20, temperature=0):   # tok: (B,) per step
        ...
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None      # None -> n_head (MHA); 1 -> MQA; in between -> GQA
    d_model: int = 768
    ffn_hidden: int | None = None     # None -> 8/3 * d_model rounded UP to a multiple of 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model config {name}={getattr(self, name)!r} must be a positive integer.")
        if self.vocab_size > 65536:
            raise ValueError(f"model config vocab_size={self.vocab_size} exceeds 65536: token ids must fit uint16 "
                             "shards; train a smaller tokenizer.")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_model % self.n_head:
            raise ValueError(f"model config d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                             "pick n_head that divides d_model.")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"model config n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                             "pick n_kv_head that divides n_head.")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"model config head_dim={self.d_model // self.n_head} must be even for rotary "
                             "embeddings; change d_model or n_head.")
        if self.ffn_hidden is None:
            # SwiGLU has three matrices, not two: 8/3*d keeps the MLP at 8*d^2 parameters like a 4*d GELU MLP.
            self.ffn_hidden = 256 * math.ceil(8 * self.d_model / 3 / 256)
        self.head_dim = self.d_model // self.n_head


# Parameter counts (printed by tests/test_llm.py::test_preset_param_counts, listed in the README):
# "non-embedding" leaves out only the input embedding lookup; lm_head is a real matmul and stays in.
PRESETS: dict[str, dict] = {
    # For tests: 0.20M parameters, runs in milliseconds.
    "tiny": dict(vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=256),
    # 8.9M with a 4096 vocab, small enough to train on 2 CPU cores in minutes.
    "demo": dict(vocab_size=4096, n_layer=8, n_head=4, d_model=256, max_seq_len=512),
    # GPT-2 small / medium shapes with a 32k vocab: 135M and 375M in total.
    "125m": dict(vocab_size=32768, n_layer=12, n_head=12, d_model=768, max_seq_len=2048),
    "350m": dict(vocab_size=32768, n_layer=24, n_head=16, d_model=1024, max_seq_len=2048),
    # TinyLlama's shape (22 layers, d 2048, ffn 5632, 4 KV heads) with head_dim 128: 1.06B non-embedding
    # (0.99B in the transformer blocks alone), 1.13B in total.
    "1b": dict(vocab_size=32768, n_layer=22, n_head=16, n_kv_head=4, d_model=2048, max_seq_len=2048),
}


def model_config(name_or_cfg, **overrides) -> ModelConfig:
    """A ModelConfig from a preset name, a ModelConfig or a dict (e.g. from meta.json), plus overrides."""
    if isinstance(name_or_cfg, ModelConfig):
        base = {f.name: getattr(name_or_cfg, f.name) for f in fields(ModelConfig)}
    elif isinstance(name_or_cfg, dict):
        base = dict(name_or_cfg)
    elif name_or_cfg in PRESETS:
        base = dict(PRESETS[name_or_cfg])
    else:
        raise ValueError(f"unknown model preset {name_or_cfg!r}; choose one of {', '.join(PRESETS)}.")
    base.update(overrides)
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}.")
    return ModelConfig(**base)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as HF's LlamaRMSNorm (https://arxiv.org/abs/1910.07467)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)   # HF rounds to x's dtype before the weight multiply: so do we


def rope_cos_sin(pos, head_dim: int, theta: float):
    """cos/sin for rotary embeddings (https://arxiv.org/abs/2104.09864) at integer positions pos (B, T).
    Float32, computed per forward or per KV cache, so there is no buffer that .to(bfloat16) could round."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    freqs = pos.float()[..., None] * inv_freq            # (B, T, head_dim/2)
    cos, sin = freqs.cos(), freqs.sin()
    # HF's layout, halves not interleaved; sin carries rotate_half's sign: (-sin, sin), see apply_rope.
    return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]   # (B, 1, T, head_dim) each


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + head_dim/2): HF's rotate_half convention, so HF weights need no permutation.
    rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1), and that sign is already in sin."""
    if cos.dtype != x.dtype:   # under autocast q/k are bf16 while the table is float32 (HF casts the same way)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin                 # (B, H, T, head_dim)


def doc_positions_and_mask(doc_ids):
    """For packed rows: rotary positions that restart at 0 at each document, and a mask that keeps attention
    inside a document. A document is a contiguous run of equal doc_ids, so ids may repeat across a row."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device)                           # (T,)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)                  # (B, T): True where a document begins
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, t, 0).cummax(dim=1).values               # (B, T): index of the document's start
    segment = starts.cumsum(dim=1)                                       # (B, T): 1, 1, 2, 2, 2, 3, ...
    same_doc = segment[:, :, None] == segment[:, None, :]                # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return t - first, (same_doc & causal)[:, None]                       # (B, T), (B, 1, T, T)


def decode_weight(module, names, cache, layer):
    """For generation: the weights of module's projections `names`, stacked so that one matmul does the work of
    two or three, and transposed to (in, out) for `x @ w`. Both are for one-token decode steps, which on CPU
    are bound by per-op overhead and by reading every weight once per token: there MKL streams an (in, out)
    matrix ~1.3x faster than nn.Linear's x @ w.T reads an (out, in) one (decode +13% end to end, BENCHMARKS.md).
    Built once per generate call and kept in its KV cache, as the weights cannot change during one call: a
    second copy of the matmul weights while generating, made again at every call (a chat turn): 4.2 GB for the
    1b preset in float32, as sample.py runs it on CPU, 2.1 GB in bf16. Training keeps nn.Linear: a stacked copy
    would be saved for backward, a full extra copy of the weights per layer under FSDP."""
    key = (layer, names)
    if key not in cache.weights:
        cache.weights[key] = torch.cat([getattr(module, n).weight for n in names]).t().contiguous()  # (in, out)
    return cache.weights[key]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        B, T, _ = x.shape
        H, KV = self.n_head, self.n_kv_head
        if cache is None:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # (B, T, (H + 2KV) * hd)
        else:
            qkv = x @ decode_weight(self, ("q_proj", "k_proj", "v_proj"), cache, layer)
        qkv = qkv.view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)               # (B, H + 2KV, T, hd)
        q, k = apply_rope(qkv[:, :H + KV], cos, sin).split([H, KV], dim=1)           # (B, H|KV, T, hd)
        v = qkv[:, H + KV:]                                                           # (B, KV, T, hd)
        is_causal = mask is None
        if cache is not None:
            start = cache.pos
            k, v = cache.update(layer, k, v)             # (B, KV, start+T, hd): everything seen so far
            if T == 1:
                is_causal = False                        # one new query sees every cached key
            elif start > 0:                              # several new queries after a prefix: bottom-right causal
                rows = start + torch.arange(T, device=x.device)
                mask, is_causal = torch.arange(start + T, device=x.device) <= rows[:, None], False   # (T, start+T)
        gqa = KV != H
        if gqa and mask is not None and q.is_cuda:
            # CUDA's masked kernels do not take GQA (SDPA would fall back to the slow math kernel), so expand
            # K/V here; the unmasked path (pretraining, FlashAttention) keeps K/V small via enable_gqa.
            k = k.repeat_interleave(H // KV, dim=1)                                    # (B, H, S, hd)
            v = v.repeat_interleave(H // KV, dim=1)                                    # (B, H, S, hd)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)                                         # (B, T, H * hd)
        return self.o_proj(y) if cache is None else y @ decode_weight(self, ("o_proj",), cache, layer)


class MLP(nn.Module):
    """SwiGLU (https://arxiv.org/abs/2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x, cache=None, layer=0):
        if cache is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = (x @ decode_weight(self, ("gate_proj", "up_proj"), cache, layer)).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ decode_weight(self, ("down_proj",), cache, layer)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x), cache, layer)


class KVCache:
    """Preallocated keys/values for every layer; prefill writes T positions, each decode step writes one. It lives
    for one generate call, so it also holds that call's rotary table and stacked weights (see decode_weight)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        # One tensor per layer, not one (L, ...) tensor: a decode step writes and reads each layer's cache with
        # one narrow per access instead of a select and three slices, and on CPU every op counts (decode_weight).
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]  # (B, KV, max, hd)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]  # (B, KV, max, hd)
        self.max_len = max_len
        self.pos = 0                                              # positions filled (advanced after all layers)
        self.weights = {}                                         # decode_weight's, built on first use
        positions = torch.arange(max_len, device=device)[None]
        # Rounded to the cache's dtype once here, as apply_rope would round them per call (HF does the same).
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)                               # (1, 1, max_len, hd) each

    def update(self, layer: int, k, v):
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions but {end} were requested.")
        self.k[layer].narrow(2, self.pos, k.shape[2]).copy_(k)
        self.v[layer].narrow(2, self.pos, v.shape[2]).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)  # (B, KV, end, hd) each


# ----------------------------------------------------------------------------------------------------------------
# The model


class LLM(nn.Module):
    compiled_hidden = None   # torch.compile(LLM.hidden), made by the first compile_decode()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.decode_compiled = False   # compile_decode() sets it
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every matrix ~ N(0, 0.02) (GPT-2); the two projections that write into the residual stream (o_proj,
        down_proj) get std 0.02/sqrt(2*n_layer) so the stream's variance does not grow with depth (GPT-2 paper,
        sec. 2.3). Norm weights start at 1."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def hidden(self, idx, doc_ids=None, cache=None):
        """Final normed hidden states (B, T, d_model): everything but lm_head."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                             "use shorter inputs or a larger max_seq_len.")
        mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids cannot be combined with a KV cache; pass one or the other.")
            pos, mask = doc_positions_and_mask(doc_ids)                          # (B, T), (B, 1, T, T)
            cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        elif cache is not None:
            cos, sin = cache.cos.narrow(2, start, T), cache.sin.narrow(2, start, T)         # (1, 1, T, hd) each
        else:
            pos = torch.arange(T, device=idx.device)[None]                      # (1, T)
            cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(idx)                                               # (B, T, d_model)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def forward(self, idx, targets=None, loss_mask=None, doc_ids=None, reduction="mean"):
        """idx (B, T). targets (B, T), -1 = ignore; loss_mask (B, T), 0 = ignore. doc_ids (B, T): packed documents.
        Returns logits (B, T, V) and the cross-entropy (float32) over valid positions: their mean, or their sum
        with reduction="sum". With no valid position the mean is 0 (and so are the gradients), not NaN."""
        logits = self.lm_head(self.hidden(idx, doc_ids))                         # (B, T, V)
        if targets is None:
            return logits, None
        valid = targets != -1                                                    # (B, T)
        if loss_mask is not None:
            valid = valid & (loss_mask != 0)
        targets = targets.masked_fill(~valid, -1)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum")
        if reduction == "sum":
            return logits, loss
        if reduction != "mean":
            raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'.")
        return logits, loss / valid.sum().clamp(min=1)

    def num_params(self, non_embedding=False) -> int:
        """Unique parameters (a tied matrix counts once). non_embedding drops the input embedding table, a lookup
        that costs no FLOPs; when it is tied it is also lm_head's matmul and stays (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, forward + backward: 6N for the matmuls plus 12*L*H*Q*T for attention scores
        and values (PaLM, https://arxiv.org/abs/2204.02311 appendix B). N = non-embedding parameters."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    def compile_decode(self):
        """Run generate's one-token steps through torch.compile, which fuses the ~20 small ops between each
        layer's matmuls: on CPU they cost about as much as the matmuls themselves (reading the weights). Dynamic
        shapes, so one compile serves every position and prompt length (batch size 1 and larger ones compile
        once each: torch specializes size 1); 10-60 s the first time on 2 CPU cores, then cached on disk by
        torch. Prefill stays eager: it runs once per call."""
        # One compiled LLM.hidden for every model, called with the model as an argument: a compiled bound method
        # would go on calling the original model from a copy.deepcopy of this one.
        if LLM.compiled_hidden is None:
            LLM.compiled_hidden = torch.compile(LLM.hidden, dynamic=True)
        self.decode_compiled = True
        return self

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None, stop_ids=(),
                 use_cache=True):
        """Continue idx (B, T); a Python generator that yields the next token of every row, (B,), per step.
        temperature 0 = greedy. seed -> a torch.Generator on idx.device (None: torch's global RNG). Stops when
        every row has produced a stop id; rows that stopped keep yielding the stop id they produced."""
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError(f"generate needs a non-empty (B, T) prompt, got shape {tuple(idx.shape)}.")
        if idx.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt of {idx.shape[1]} tokens + {max_new_tokens} new tokens exceeds "
                             f"max_seq_len={self.config.max_seq_len}; shorten the prompt or max_new_tokens.")
        if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
            raise ValueError(f"bad sampling settings temperature={temperature}, top_k={top_k}, top_p={top_p}; "
                             "need temperature >= 0, top_k >= 1, 0 < top_p <= 1.")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        return self._generate(idx, max_new_tokens, temperature, top_k, top_p, generator, stop_ids, use_cache)

    @torch.no_grad()
    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator, stop_ids, use_cache):
        B, T = idx.shape
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)                      # (B,)
        cache = None
        if use_cache:
            dtype = self.lm_head.weight.dtype
            cache = KVCache(self.config, B, T + max_new_tokens, idx.device, dtype)
        decode = LLM.compiled_hidden if self.decode_compiled else LLM.hidden
        h = self.hidden(idx, cache=cache)                                                # prefill: (B, T, d)
        for step in range(max_new_tokens):
            last = h[:, -1]                                                              # (B, d)
            logits = self.lm_head(last) if cache is None else last @ decode_weight(self, ("lm_head",), cache, -1)
            tok = sample_next(logits.float(), temperature, top_k, top_p, generator)     # (B,)
            if len(stops):  # only then: done.all() below costs a GPU sync and a few ops per token
                tok = torch.where(done, idx[:, -1], tok)    # finished rows repeat the stop id they produced
                done = done | torch.isin(tok, stops)
            yield tok
            if step == max_new_tokens - 1 or (len(stops) and bool(done.all())):
                return
            if use_cache:  # the cache holds everything before: feed only the new token
                idx = tok[:, None]                                                       # (B, 1)
                h = decode(self, idx, cache=cache)
            else:
                idx = torch.cat([idx, tok[:, None]], dim=1)                              # (B, T + step + 1)
                h = decode(self, idx)


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): argmax at temperature 0, else softmax(logits / temperature)
    restricted to the top_k tokens and to the smallest set whose probability reaches top_p (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                           # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)                      # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # drop a token once the mass before it already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)                                                       # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)                  # (B,)
