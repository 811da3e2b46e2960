"""A Llama-style decoder: pre-norm RMSNorm, rotary embeddings, grouped-query attention, SwiGLU,
no biases.

One file, read top to bottom: config and presets, the building blocks, the model. Parameter names
are Hugging Face Llama's without the "model." prefix, so export/import is one line per tensor.
Generation (KV cache, sampling, decode compilation) lives in generate.py, which runs this file's
one forward on a decode copy of the model; what it sets there: Attention.kv_cache and, in place of
two methods, faster Attention.project_qkv and LLM.rope. Packed rows (doc_ids) attend inside their
documents: FlexAttention with a BlockMask on CUDA, SDPA with a dense mask elsewhere. The loss is
chunked (ChunkedCrossEntropy): no float32 logits of a whole batch.

    from llm import LLM, model_config
    model = LLM(model_config("tiny"))
    logits, _ = model(idx)                              # idx: (B, T) LongTensor
    _, loss = model(idx, targets)                       # targets: (B, T); logits never whole
"""
import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# Devices whose packed rows (doc_ids) run FlexAttention. torch 2.13's flex_attention has no
# backward on CPU or MPS (it raises NotImplementedError), so there they keep SDPA with a dense
# (B, 1, T, T) mask; tests/test_flex_attention.py checks that both give the same logits and grads.
FLEX_DEVICES = ("cuda",)
# Tokens per chunk of the loss (ChunkedCrossEntropy): each chunk's float32 logits and their
# gradient live only while it is computed: 1024 x 32768 x 4 bytes = 128 MiB each for a 32k vocab,
# a 16th of a 1b micro-batch's (8 x 2048 tokens), yet each chunk's lm_head matmul stays a
# GPU-filling (1024, d) x (d, V) GEMM. Demo and test batches of up to 1024 tokens are one chunk.
LOSS_CHUNK = 1024


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
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config {name}={value!r} must be a positive integer.")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_model % self.n_head:
            raise ValueError(f"model config d_model={self.d_model} is not divisible by "
                             f"n_head={self.n_head}; pick n_head that divides d_model.")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"model config n_head={self.n_head} is not divisible by "
                             f"n_kv_head={self.n_kv_head}; pick n_kv_head that divides n_head.")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"model config head_dim={self.d_model // self.n_head} must be even "
                             "for rotary embeddings; change d_model or n_head.")
        if self.ffn_hidden is None:
            # SwiGLU has three matrices, not two: 8/3*d keeps the MLP at 8*d^2 parameters like a
            # 4*d GELU MLP.
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
    # TinyLlama's shape (22 layers, d 2048, ffn 5632, 4 KV heads) with head_dim 128: 1.06B
    # non-embedding (0.99B in the transformer blocks alone), 1.13B in total.
    "1b": dict(vocab_size=32768, n_layer=22, n_head=16, n_kv_head=4, d_model=2048,
               max_seq_len=2048),
}


def model_config(name_or_cfg, **overrides) -> ModelConfig:
    """A ModelConfig from a preset name, a ModelConfig or a dict (e.g. from meta.json), plus
    overrides."""
    if isinstance(name_or_cfg, ModelConfig):
        base = {f.name: getattr(name_or_cfg, f.name) for f in fields(ModelConfig)}
    elif isinstance(name_or_cfg, dict):
        base = dict(name_or_cfg)
    elif name_or_cfg in PRESETS:
        base = dict(PRESETS[name_or_cfg])
    else:
        raise ValueError(f"unknown model preset {name_or_cfg!r}; choose one of "
                         f"{', '.join(PRESETS)}.")
    base.update(overrides)
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {', '.join(unknown)}; "
                         f"known keys: {', '.join(sorted(known))}.")
    return ModelConfig(**base)


# -------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as HF's LlamaRMSNorm
    (https://arxiv.org/abs/1910.07467)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)   # HF rounds to x's dtype before the weight multiply


def rope_cos_sin(pos, head_dim: int, theta: float):
    """cos/sin for rotary embeddings (https://arxiv.org/abs/2104.09864) at integer positions pos
    (B, T). Float32 and computed per forward: no buffer that .to(bfloat16) could round."""
    exponent = torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / theta ** exponent                               # (head_dim/2,)
    freqs = pos.float()[..., None] * inv_freq                        # (B, T, head_dim/2)
    cos, sin = freqs.cos(), freqs.sin()
    # HF's layout, halves not interleaved; sin carries rotate_half's sign: (-sin, sin), apply_rope
    cos = torch.cat([cos, cos], -1)[:, None]                         # (B, 1, T, head_dim)
    sin = torch.cat([-sin, sin], -1)[:, None]                        # (B, 1, T, head_dim)
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + head_dim/2): HF's rotate_half convention, so HF weights need no
    permutation. rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1), and that sign is already in sin."""
    if cos.dtype != x.dtype:   # under autocast q/k are bf16, the table float32 (HF casts the same)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin                 # (B, H, T, head_dim)


def doc_positions(doc_ids):
    """For packed rows (B, T): rotary positions that restart at 0 at each document, and each token's
    segment, the number of its document in the row. A document is a contiguous run of equal
    doc_ids, so ids may repeat across a row."""
    t = torch.arange(doc_ids.shape[1], device=doc_ids.device)        # (T,)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)              # (B, T): True at a doc's start
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, t, 0).cummax(dim=1).values           # (B, T): where the doc starts
    return t - first, starts.cumsum(dim=1)                           # (B, T), (B, T): 1, 1, 2, ...


def doc_mask(segment, flex: bool):
    """Causal attention inside each document of packed rows, from segment (B, T): a BlockMask for
    flex_attention, which skips the blocks that cross documents and keeps GQA's K/V small
    (torchtitan's document masking), or the dense (B, 1, T, T) boolean mask for SDPA."""
    B, T = segment.shape
    if flex:
        def same_doc_causal(b, h, q, kv):
            return (segment[b, q] == segment[b, kv]) & (kv <= q)
        # compiled on CUDA (as torchtitan does): eager evaluates the mask at all B*T*T pairs
        return create_block_mask(same_doc_causal, B, None, T, T, device=segment.device,
                                 _compile=segment.is_cuda)
    same_doc = segment[:, :, None] == segment[:, None, :]            # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    return (same_doc & causal)[:, None]                              # (B, 1, T, T)


@functools.cache
def _compiled_flex():
    # on first use only: torch.compile imports torch._dynamo (about 1 s), which eval does not need
    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        # generate.py's KV cache for one generation (gpt-fast's setup_caches), set on the copy of
        # the model that generation makes: update(start, k, v) stores the keys and values of the
        # positions from start on and returns those of every position up to them. None here.
        self.kv_cache = None

    def forward(self, x, cos, sin, mask=None, start=0):
        B, T, _ = x.shape
        H, KV = self.n_head, self.n_kv_head
        qkv = self.project_qkv(x).view(B, T, H + 2 * KV, self.head_dim)      # (B, T, H + 2KV, hd)
        qkv = qkv.transpose(1, 2)                                             # (B, H + 2KV, T, hd)
        q, k = apply_rope(qkv[:, :H + KV], cos, sin).split([H, KV], dim=1)    # (B, H|KV, T, hd)
        v = qkv[:, H + KV:]                                                   # (B, KV, T, hd)
        if self.kv_cache is not None:   # the keys and values of positions before start are cached
            k, v = self.kv_cache.update(start, k, v)                          # (B, KV, start+T, hd)
        gqa = KV != H
        if isinstance(mask, BlockMask):   # packed documents on CUDA (see doc_mask)
            # flex is fused only when compiled: inside compiled blocks it is; outside them (compile
            # off, eval of an unwrapped model) call the compiled function, not the unfused one
            # that materialises all B*H*T*T scores
            eager = q.is_cuda and not torch.compiler.is_compiling()   # (CPU: tests' reference)
            flex = _compiled_flex() if eager else flex_attention
            y = flex(q, k, v, block_mask=mask, enable_gqa=gqa)                # (B, H, T, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))          # (B, T, d_model)
        # No mask: causal from the first position, or one new query that sees every cached key.
        # A dense mask: packed documents off CUDA, or several new queries after cached keys.
        is_causal = mask is None and T > 1
        if gqa and mask is not None and q.is_cuda:
            # CUDA's masked kernels do not take GQA (SDPA would fall back to the slow math kernel),
            # so expand K/V here; the unmasked path (pretraining, FlashAttention) keeps them small.
            k = k.repeat_interleave(H // KV, dim=1)                           # (B, H, S, hd)
            v = v.repeat_interleave(H // KV, dim=1)                           # (B, H, S, hd)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=gqa)                    # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))              # (B, T, d_model)

    def project_qkv(self, x):
        """q, k and v side by side: (B, T, (H + 2KV) * hd). Generation's decode copy (generate.py)
        puts one matmul over the three weights stacked in its place."""
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class MLP(nn.Module):
    """SwiGLU (https://arxiv.org/abs/2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """lm_head's cross-entropy, LOSS_CHUNK positions at a time: each chunk's float32 logits are
    made, turned into its loss and its share of the gradients for h and weight, and dropped, so no
    chunk's logits outlive it and backward only scales the gradients made here (Liger Kernel's
    fused linear cross-entropy in plain torch: no recomputed matmul, unlike a checkpoint per chunk).

    apply(h (N, d), weight (V, d), targets (N,) < 0 = ignore, with_grad) -> (sum of the losses,
    the loss of each position (N,), float32, 0 where ignored; not differentiable)."""

    @staticmethod
    def forward(ctx, h, weight, targets, with_grad):
        device = h.device.type
        # the matmuls in the dtype nn.Linear would use: autocast's if on, else h's
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        fp32 = torch.promote_types(dtype, torch.float32)   # float64 for a float64 model (tests)
        x_all = h.to(dtype)
        w = weight.to(dtype)
        losses, dh = [], []
        dw = torch.zeros_like(weight, dtype=fp32) if with_grad else None
        with torch.autocast(device, enabled=False):
            for i in range(0, h.shape[0], LOSS_CHUNK):
                x = x_all[i:i + LOSS_CHUNK]                                  # (n, d)
                t = targets[i:i + LOSS_CHUNK]                                # (n,)
                logits = (x @ w.t()).to(fp32)                                # (n, V)
                lse = logits.logsumexp(-1)                                   # (n,)
                picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]     # (n,)
                valid = t >= 0
                losses.append((lse - picked) * valid)
                if with_grad:   # d(loss)/d(logits) = softmax - one_hot(target); 0 where ignored
                    g = logits.sub_(lse[:, None]).exp_()      # softmax, in logits' memory (n, V)
                    g.scatter_add_(1, t.clamp(min=0)[:, None], -torch.ones_like(lse)[:, None])
                    g = g.mul_(valid[:, None]).to(dtype)
                    dh.append((g @ w).to(h.dtype))                           # (n, d)
                    dw += g.t() @ x                # in place, promoted to fp32 (V, d)
        losses = torch.cat(losses)                                           # (N,)
        ctx.mark_non_differentiable(losses)
        if with_grad:
            ctx.save_for_backward(torch.cat(dh), dw.to(weight.dtype))
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, grad_losses):
        dh, dw = ctx.saved_tensors
        return dh * grad_sum, dw * grad_sum, None, None


# -------------------------------------------------------------------------------------------------
# The model


class LLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every matrix ~ N(0, 0.02) (GPT-2); the two projections that write into the residual
        stream (o_proj, down_proj) get std 0.02/sqrt(2*n_layer) so the stream's variance does not
        grow with depth (GPT-2 paper, sec. 2.3). Norm weights start at 1."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def hidden(self, idx, doc_ids=None, start=0):
        """Final normed hidden states (B, T, d_model): everything but lm_head. start is the position
        of idx's first token: above 0 only in generation, where KV caches hold the tokens before."""
        B, T = idx.shape
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds "
                             f"max_seq_len={self.config.max_seq_len}; use shorter inputs or a "
                             "larger max_seq_len.")
        mask = None
        if doc_ids is not None:
            if start:
                raise ValueError("doc_ids cannot be combined with a KV cache; pass one or the "
                                 "other.")
            pos, segment = doc_positions(doc_ids)                         # (B, T) each
            mask = doc_mask(segment, flex=idx.device.type in FLEX_DEVICES)   # once per batch
        else:
            pos = torch.arange(start, start + T, device=idx.device)[None]          # (1, T)
            if start and T > 1:   # several new queries after cached keys: causal, bottom-right
                keys = torch.arange(start + T, device=idx.device)                  # (S,)
                mask = keys <= pos[0, :, None]                                     # (T, S)
        cos, sin = self.rope(pos)                                        # (B|1, 1, T, hd) each
        x = self.embed_tokens(idx)                                       # (B, T, d_model)
        for block in self.layers:
            x = block(x, cos, sin, mask, start)
        return self.norm(x)

    def rope(self, pos):
        """Rotary cos/sin at positions pos (B, T), computed per call. Generation's decode copy
        (generate.py) puts a table lookup in its place."""
        return rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)

    def forward(self, idx, targets=None, loss_mask=None, doc_ids=None, reduction="mean"):
        """idx (B, T); doc_ids (B, T): packed documents. Without targets -> (logits (B, T, V),
        None). With targets (B, T) -> (None, self.loss(...)): the logits are never whole."""
        h = self.hidden(idx, doc_ids)                                    # (B, T, d_model)
        if targets is None:
            return self.lm_head(h), None
        return None, self.loss(h, targets, loss_mask, reduction)

    def loss(self, h, targets, loss_mask=None, reduction="mean"):
        """Cross-entropy (float32) of lm_head(h) against targets (B, T), < 0 = ignore; loss_mask
        (B, T), 0 = ignore. reduction "mean" over valid positions (0, not NaN, when there is none),
        "sum", or "none": per position (B, T), 0 where ignored.

        ChunkedCrossEntropy: no float32 logits of the whole batch, ever; backward keeps only the
        gradients for h and lm_head made in forward. Traces with torch.compile(fullgraph=True)."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r} is not supported; use 'mean', 'sum' or "
                             "'none'.")
        valid = targets >= 0   # -1 is kiln's ignore value; -100 (Hugging Face's) is ignored too
        if loss_mask is not None:
            valid = valid & (loss_mask != 0)
        weight = self.lm_head.weight
        # "none" is for evaluation: its per-position losses carry no gradient, so none is made
        with_grad = (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
                     and reduction != "none")
        total, losses = ChunkedCrossEntropy.apply(
            h.flatten(0, 1), weight, targets.masked_fill(~valid, -1).flatten(), with_grad)
        if reduction == "none":
            return losses.view(targets.shape)
        if reduction == "sum":
            return total
        return total / valid.sum().clamp(min=1)

    def num_params(self, non_embedding=False) -> int:
        """Unique parameters (a tied matrix counts once). non_embedding drops the input embedding
        table, a lookup that costs no FLOPs; when it is tied it is also lm_head's matmul and stays
        (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, forward + backward: 6N for the matmuls plus 12*L*H*Q*T for
        attention scores and values (PaLM, https://arxiv.org/abs/2204.02311 appendix B).
        N = non-embedding parameters."""
        cfg = self.config
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
        return 6 * self.num_params(non_embedding=True) + attention
