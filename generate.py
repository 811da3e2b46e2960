"""Generation for llm.LLM: KV cache, sampling, the token loop and decode compilation.

    import generate
    for tok in generate.generate(model, idx, 20, temperature=0):  # idx (B, T); tok (B,) per step
        ...
    generate.compile_decode(model)   # later calls run their one-token steps compiled

Middle floor: imports llm and torch only. Like nanochat's engine.py it knows nothing of tokenizers.
Like gpt-fast's, the KV cache sits inside attention (llm.Attention.kv_cache); here it is set on a
decode copy of the model that each generate call makes, so the model never holds one, and that copy
runs llm.py's one forward with the CPU decode tricks below (InOutMatmul, RopeTable). Scoring
(eval_mmlu.py) uses the same copy: a prefix shared by many rows runs once (prefill_shared), and
the last block's MLP runs only at the positions scored (for_scoring).
"""
import functools

import torch
import torch.nn as nn

from llm import LLM, Attention, rope_cos_sin


class KVCache:
    """One layer's keys and values for one generate call, preallocated: prefill writes the prompt's
    positions, each decode step one more, and attention reads every position written so far."""

    def __init__(self, shape, device, dtype):
        self.k = torch.zeros(shape, device=device, dtype=dtype)                  # (B, KV, max, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)                  # (B, KV, max, hd)

    def update(self, start, k, v):
        """Store k, v (B, KV, T, hd) at positions start..start+T-1 of the first B rows; return
        their positions 0..start+T-1. The position comes from the caller, not a count kept here:
        torch.compile takes an int kept on a module for a constant and would compile once per
        position."""
        B, T = k.shape[0], k.shape[2]
        end = start + T
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions but {end} were "
                             "requested.")
        keys = self.k if B == self.k.shape[0] else self.k[:B]   # a last, smaller batch (scoring)
        values = self.v if B == self.v.shape[0] else self.v[:B]
        keys.narrow(2, start, T).copy_(k)
        values.narrow(2, start, T).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)                 # (B, KV, end, hd)


class InOutMatmul:
    """The matmul of an nn.Linear, or of several side by side, for generation: x @ w with w their
    weights stacked and transposed to (in, out).

    A one-token step on CPU is bound by per-op overhead and by reading every weight once per token:
    one matmul does the work of three, and MKL streams an (in, out) matrix ~1.3x faster than
    F.linear reads an (out, in) one (decode +13% end to end, BENCHMARKS.md). w is made at first use
    in each generate call, so an optimizer step between two calls reaches the next one, and under
    FSDP the weights are read after the block's hook has gathered them. It costs a second copy of
    the matmul weights while generating (4.2 GB for the 1b preset in float32), which is why
    training keeps nn.Linear. A plain object, not an nn.Module: no hook dispatch per call (1.3 us,
    2% of a decode step)."""

    def __init__(self, *linears, dtype=None):
        self.linears = linears
        self.dtype = dtype   # None: the weights'; autocast's, so that it need not cast per call
        self.weight_t = None

    def __call__(self, x):
        if self.weight_t is None:
            weights = torch.cat([linear.weight for linear in self.linears])
            self.weight_t = weights.t().to(self.dtype or weights.dtype).contiguous()  # (in, out)
        return x @ self.weight_t


class RopeTable:
    """LLM.rope for generation: cos/sin of the max_len positions of one generate call, computed
    once and rounded to the cache's dtype once (as apply_rope would round them per step). A step
    reads its rows instead of computing ~15 small ops, 2% of a decode step on CPU."""

    def __init__(self, config, max_len, device, dtype):
        pos = torch.arange(max_len, device=device)[None]                        # (1, max_len)
        cos, sin = rope_cos_sin(pos, config.head_dim, config.rope_theta)       # (1, 1, max, hd)
        self.cos = cos[0, 0].to(dtype)                                           # (max, hd)
        self.sin = sin[0, 0].to(dtype)                                           # (max, hd)

    def __call__(self, pos):
        return self.cos[pos][:, None], self.sin[pos][:, None]   # pos (B, T) -> (B, 1, T, hd) each


def decode_copy(module, dtype=None):
    """module's tree for one generate call: new module objects (for KV caches that the model never
    sees) around the same parameters; each nn.Linear becomes an InOutMatmul of it (its weights in
    dtype, default theirs), and attention projects q, k and v with one InOutMatmul of the three
    (in place of Attention.project_qkv)."""
    # A new object of module's class sharing its parameters, buffers and hooks (copy.copy's way,
    # without calling the class: FSDP's module classes would run __init__ again).
    twin = object.__new__(type(module))
    vars(twin).update(vars(module))
    twin._modules = {}           # a dict of children of its own
    # A forward set on the instance (parallel.py's activation checkpointing and torch.compile set
    # block.forward and norm.forward) is bound to the original module and would bypass the copy:
    # the class's forward runs instead.
    vars(twin).pop("forward", None)
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(twin, name, InOutMatmul(child, dtype=dtype))   # a plain attribute
        else:
            setattr(twin, name, decode_copy(child, dtype))
    if isinstance(module, Attention):   # an instance attribute, found before the method
        twin.project_qkv = InOutMatmul(module.q_proj, module.k_proj, module.v_proj, dtype=dtype)
    return twin


def with_kv_cache(model, batch_size, max_len, dtype=None):
    """A decode copy of model (decode_copy) whose attention layers hold KV caches for batch_size
    rows of up to max_len positions, in dtype (default: lm_head's; under autocast, pass autocast's),
    and whose rope is a RopeTable. Feed it tokens in order, each chunk through hidden(idx, start=the
    number of tokens fed before); a chunk of fewer rows uses the first rows of the caches."""
    twin = decode_copy(model, dtype)   # autocast's dtype: weights cast once, not per forward
    cfg = model.config
    shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
    weight = model.lm_head.weight
    dtype = dtype or weight.dtype
    for block in twin.layers:
        block.self_attn.kv_cache = KVCache(shape, weight.device, dtype)
    twin.rope = RopeTable(cfg, max_len, weight.device, dtype)   # in place of LLM.rope
    return twin


@torch.no_grad()
def prefill_shared(net, prefix):
    """Run prefix (P,) once through net (a with_kv_cache copy) and give every row of its caches
    the prefix's keys and values, copied once: each row's own tokens then follow as
    net.hidden(idx, start=P), batch after batch, and the prefix is never run again (eval_mmlu.py:
    a subject's few-shot examples, shared by its questions). A for_scoring copy: score_at(net, (),
    ()) first, as no prefix position is scored."""
    P = prefix.shape[0]
    net.hidden(prefix[None])
    for block in net.layers:
        cache = block.self_attn.kv_cache
        for buffer in (cache.k, cache.v):                               # (B, KV, max_len, hd)
            buffer[1:, :, :P] = buffer[:1, :, :P]


class AtPositions:
    """fn run at chosen positions only: called on x (B, T, d) it returns fn(x[rows, cols]) there and
    zeros elsewhere; rows, cols are set before each forward pass (none: fn runs nowhere)."""

    def __init__(self, fn):
        self.fn = fn
        self.rows = self.cols = ()

    def __call__(self, x):
        if not len(self.rows):
            return torch.zeros_like(x)
        y = self.fn(x[self.rows, self.cols])                    # (N, d_out), autocast's dtype
        out = x.new_zeros(x.shape[:-1] + y.shape[-1:], dtype=y.dtype)          # (B, T, d_out)
        out[self.rows, self.cols] = y
        return out


def for_scoring(model, batch_size, max_len, dtype=None):
    """with_kv_cache's copy for scoring (eval_mmlu.py), where only the final hidden states at a few
    positions per row are read: set them with score_at(net, rows, cols) before each hidden call.
    The last block's attention still runs at every position (its keys and values are needed
    there), but its output projection and MLP run only at those positions: elsewhere they would
    write into states nobody reads: ~1/6 of the work of a 4-layer model, ~1/30 of a 22-layer one."""
    net = with_kv_cache(model, batch_size, max_len, dtype)
    last = net.layers[-1]
    last.self_attn.o_proj = AtPositions(last.self_attn.o_proj)   # an InOutMatmul already
    # a module: taken out of _modules, so that a plain object can take its name
    mlp = last._modules.pop("mlp")
    last.mlp = AtPositions(mlp)
    return net


def score_at(net, rows, cols):
    """The positions (rows, cols: (N,) LongTensors) whose final hidden states the next
    net.hidden call of a for_scoring copy computes; the others are left wrong."""
    last = net.layers[-1]
    for at in (last.self_attn.o_proj, last.mlp):
        at.rows = rows
        at.cols = cols


@functools.cache
def compiled_hidden():
    """torch.compile of LLM.hidden, one for every model: called with the model as an argument, so
    a copy.deepcopy of a compiled model decodes with its own weights (a compiled bound method would
    go on calling the original). Dynamic shapes: one graph for every position and prompt length."""
    return torch.compile(LLM.hidden, dynamic=True)


def compile_decode(model):
    """Run model's one-token decode steps through torch.compile from now on (sample.py --compile),
    which fuses the ~20 small ops between each layer's matmuls: on CPU they cost about as much as
    the matmuls themselves. Batch size 1 and larger ones compile once each (torch specializes size
    1); 10-60 s the first time on 2 CPU cores, then cached on disk by torch. Prefill stays eager:
    it runs once per call. Returns model."""
    model.decode_compiled = True   # an attribute, so that copy.deepcopy(model) decodes compiled
    return model


def sample_next(logits, temperature, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): argmax at temperature 0, else softmax(logits /
    temperature) restricted to the top_k tokens and to the smallest set whose probability reaches
    top_p (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                        # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)                   # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)                                                    # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)               # (B,)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             stop_ids=(), use_cache=True):
    """Continue idx (B, T); a Python generator that yields the next token of every row, (B,), per
    step. temperature 0 = greedy. seed -> a torch.Generator on idx.device (None: torch's global
    RNG). Stops when every row has produced a stop id; rows that stopped keep yielding the stop id
    they produced. use_cache=False runs the whole sequence through the model at every step (a
    reference for tests). Bad arguments raise here, before the first token is asked for."""
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate needs a non-empty (B, T) prompt, got shape "
                         f"{tuple(idx.shape)}.")
    if idx.shape[1] + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt of {idx.shape[1]} tokens + {max_new_tokens} new tokens exceeds "
                         f"max_seq_len={model.config.max_seq_len}; shorten the prompt or "
                         "max_new_tokens.")
    bad_top_p = top_p is not None and not 0 < top_p <= 1
    if temperature < 0 or bad_top_p or (top_k is not None and top_k < 1):
        raise ValueError(f"bad sampling settings temperature={temperature}, top_k={top_k}, "
                         f"top_p={top_p}; need temperature >= 0, top_k >= 1, 0 < top_p <= 1.")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _generate(model, idx, max_new_tokens, sampling, stop_ids, use_cache)


@torch.no_grad()
def _generate(model, idx, max_new_tokens, sampling, stop_ids, use_cache):
    B, T = idx.shape
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)                       # (B,)
    decode = compiled_hidden() if getattr(model, "decode_compiled", False) else LLM.hidden
    net = with_kv_cache(model, B, T + max_new_tokens) if use_cache else model
    h = net.hidden(idx)                                                 # prefill: (B, T, d_model)
    for step in range(max_new_tokens):
        logits = net.lm_head(h[:, -1])                                                # (B, V)
        tok = sample_next(logits.float(), **sampling)                                 # (B,)
        if len(stops):  # only then: done.all() below costs a GPU sync and a few ops per token
            tok = torch.where(done, idx[:, -1], tok)   # finished rows repeat the stop id they made
            done = done | torch.isin(tok, stops)
        yield tok
        if step == max_new_tokens - 1 or (len(stops) and bool(done.all())):
            return
        if use_cache:  # the caches hold everything before: feed only the new token
            idx = tok[:, None]                                                        # (B, 1)
            h = decode(net, idx, start=T + step)
        else:
            idx = torch.cat([idx, tok[:, None]], dim=1)                             # (B, T+step+1)
            h = decode(net, idx)
