"""The first command to run on a GPU kiln has not met (issue 14): attention kernels, the training
step and decode speed, printed as one markdown table for BENCHMARKS.md.

    python bench/gpu_check.py --out bench/out/gpu_check.md                 # one H100/H200: < 8 min
    python bench/gpu_check.py --device cpu --model tiny --out /tmp/gpu_check.md  # CPU smoke run

1. attention: each SDPA backend (flash, efficient, cudnn, math) at the 1b shape (B 8, T 2048,
   16 heads, 4 KV heads, head_dim 128, bf16, causal, GQA), and FlexAttention with a document mask
   (compiled): forward and gradient error against float32 math, time forward and forward+backward.
   An error is max |x - ref| / max |ref| over the output or over dq, dk, dv.
2. train: train.py in a fresh process on random tokens (bench/train_speed.py's runs), one micro-step
   of batch x seq per step: tokens/s, MFU, and the peak memory against plan.predicted_peak; plain,
   with activation checkpointing, and packed SFT (FlexAttention on CUDA).
3. decode: generate.generate at batch 1 (compiled decode on CUDA), tokens/s against the
   memory-bandwidth limit: bytes of the weights read per token over the HBM bandwidth
   (plan.hbm_bandwidth).

They run in the order 2, 3, 1 (the training step is what kiln knows least; cuDNN attention,
whose faults can poison the process, comes last). Each part is guarded: one that fails puts its error in the table and the rest runs. --budget caps
the whole run: a part that would start with less than its minimum left is skipped, and a training
run still going when the budget ends (or after run_seconds) is killed. torch.compile is on for CUDA
(train.py's default) and off on CPU, where compiling would take minutes.
"""
import argparse
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bpe  # after the sys.path lines above: the repo root holds the modules
import common
import config
import generate
import llm
import parallel
import plan
import train
import train_speed

# What each --model checks. attention: (B, T, heads, KV heads, head_dim); train: the config and
# the micro-batch (batch, seq); warmup + steps logged steps per training run, at most run_seconds
# each; decode: new tokens; reps: timed repetitions of each attention kernel.
SETTINGS = {
    "1b": dict(attention=(8, 2048, 16, 4, 128), config="config/pretrain_1b.py", batch=8, seq=2048,
               warmup=3, steps=5, run_seconds=150, data_tokens=2_000_000, decode_tokens=256,
               reps=10),
    "tiny": dict(attention=(2, 256, 4, 2, 32), config="config/tiny.py", batch=4, seq=64,
                 warmup=1, steps=2, run_seconds=60, data_tokens=100_000, decode_tokens=16,
                 reps=2),
}
BACKENDS = parallel.SDPA_BACKENDS   # flash, efficient, cudnn, math: attention_backends' names
# Seconds a part needs at least on (cuda, cpu); with less left in the budget it is skipped.
MIN_SECONDS = {"attention": (30, 5), "train": (60, 10), "decode": (60, 5)}


class Budget:
    def __init__(self, seconds, device):
        self.start = time.time()
        self.end = self.start + seconds
        self.column = 0 if device.type == "cuda" else 1

    def left(self):
        return self.end - time.time()

    def allows(self, part):
        return self.left() >= MIN_SECONDS[part][self.column]


def guarded(rows, part, case, budget, fn):
    """rows += fn()'s row(s), or one row with the error (or the budget) in its note."""
    if not budget.allows(part):
        rows.append((part, case, "-", "-", f"skipped: time budget ({budget.left():.0f} s left)"))
        return
    try:
        rows.append(fn())
    except Exception as e:   # one part's failure must not hide the others' numbers
        traceback.print_exc()
        message = " ".join(f"{type(e).__name__}: {e}".split())
        if len(message) > 400:   # a subprocess's stderr: its first words and its last
            message = message[:150] + " ... " + message[-250:]
        rows.append((part, case, "-", "-", f"error: {message}"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, reps):
    """Median milliseconds of fn() over reps runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def rel_err(x, ref):
    return ((x.float() - ref).abs().max() / ref.abs().max()).item()


# ---- 1. attention
def attention_inputs(shape, device, mask=None):
    """q, k, v (bf16, requiring grad), the output gradient, and the float32 math reference
    [out, dq, dk, dv] under mask (B, 1, T, T), or causal without one."""
    B, T, H, KV, hd = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, n, T, hd, device=device, generator=g, dtype=torch.bfloat16)
               for n in (H, KV, KV))
    dout = torch.randn(B, H, T, hd, device=device, generator=g, dtype=torch.bfloat16)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    ref32 = [t.detach().float().requires_grad_() for t in inputs]
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*ref32, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=True)
    grads = torch.autograd.grad(out, ref32, dout.float())
    return inputs, dout, [out.detach(), *grads]


def attention_row(case, attend, inputs, dout, ref, flops, device, reps, backward=True):
    """Errors and times of attend(q, k, v) -> out against ref [out, dq, dk, dv]; flops: of the
    forward. backward=False: the forward alone, on inputs that need no gradient."""
    if not backward:
        inputs = [t.detach() for t in inputs]
    out = attend(*inputs)
    fwd_err = rel_err(out, ref[0])
    with torch.no_grad():
        fwd_ms = median_ms(lambda: attend(*inputs), device, reps)
    result = f"fwd {fwd_ms:.3f} ms ({flops / fwd_ms / 1e9:.3g} TFLOP/s)"
    errors = f"fwd err {fwd_err:.1e}"
    worst = fwd_err
    if backward:
        grads = torch.autograd.grad(out, inputs, dout)
        grad_err = max(rel_err(g, r) for g, r in zip(grads, ref[1:]))
        step_ms = median_ms(lambda: torch.autograd.grad(attend(*inputs), inputs, dout), device,
                            reps)
        # backward: five matmuls of the forward's size to its two
        result += f", fwd+bwd {step_ms:.3f} ms ({3.5 * flops / step_ms / 1e9:.3g} TFLOP/s)"
        errors += f", grad err {grad_err:.1e}"
        worst = max(worst, grad_err)
    # bf16 operands land between 1e-3 and 1e-2 against float32 (METHOD.md); NaN never passes
    verdict = "ok" if worst < 2e-2 else ("NaN" if math.isnan(worst) else "CHECK: large error")
    if not backward:
        verdict += f" (forward only: no backward on {device.type})"
    return ("attention", case, result, errors + " vs float32 math", verdict)


def sdpa_attend(backend, gqa):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            if not gqa:   # a kernel without GQA: K/V repeated to every head
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return attend


def sdpa_row(name, inputs, dout, ref, device, reps):
    """One SDPA backend, with GQA if it takes it, else with K/V repeated, else unavailable."""
    B, H, T, hd = dout.shape
    flops = 4 * H * hd * B * T * (T + 1) / 2   # two matmuls over the causal half
    for gqa, note in ((True, ""), (False, " (K/V repeated: no GQA in this kernel)")):
        try:
            row = attention_row(f"SDPA {name}", sdpa_attend(BACKENDS[name], gqa), inputs, dout,
                                ref, flops, device, reps)
            return row[:4] + (row[4] + note,)
        except RuntimeError as e:   # SDPA says why in warnings
            if not any(m in str(e) for m in ("No available kernel", "No viable backend")):
                raise
    return ("attention", f"SDPA {name}", "-", "-", f"unavailable on {device.type}")


def flex_row(shape, device, reps, compile):
    """flex_attention with llm.py's document BlockMask on random documents (~4 a row), against
    float32 math under the same mask as a dense boolean one."""
    B, T, H, KV, hd = shape
    g = torch.Generator().manual_seed(1)
    doc_ids = torch.cumsum(torch.rand(B, T, generator=g) < 4 / T, dim=1).to(device)   # (B, T)
    _, segment = llm.doc_positions(doc_ids)
    block_mask = llm.doc_mask(segment, flex=True)
    dense = llm.doc_mask(segment, flex=False)                                    # (B, 1, T, T)
    inputs, dout, ref = attention_inputs(shape, device, mask=dense)
    flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    flops = 4 * H * hd * dense.sum().item()
    label = "FlexAttention, doc mask" + (" (compiled)" if compile else " (eager)")
    # torch 2.13's flex_attention has no backward on CPU (llm.FLEX_DEVICES)
    return attention_row(label, lambda q, k, v: flex(q, k, v, block_mask=block_mask,
                                                     enable_gqa=True),
                         inputs, dout, ref, flops, device, reps, backward=device.type == "cuda")


# ---- 2. train
def make_sft_data(data_dir, out, seq, tokens):
    """An SFT dir of random conversations of 1/8 to 1 row long, the second half of each learned,
    with data_dir's tokenizer: rows pack several, so the document mask matters."""
    if (out / "train_offsets.npy").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    tok = bpe.Tokenizer.load(data_dir)
    tok.save(out)
    rng = np.random.default_rng(0)
    lengths = rng.integers(seq // 8, seq + 1, tokens // (seq // 2))
    ids = rng.integers(len(bpe.SPECIAL_TOKENS), tok.vocab_size, lengths.sum()).astype(np.uint16)
    mask = np.concatenate([np.arange(n) >= n // 2 for n in lengths]).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for name, a in (("ids", ids), ("mask", mask), ("offsets", offsets)):
        np.save(out / f"train_{name}.npy", a)
    meta = {"kind": "sft", "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size,
            "train_conversations": len(lengths), "val_conversations": 0, "counts": {}}
    common.write_json(out / "meta.json", meta)


def train_row(case, extra, a, settings, device, budget):
    """One train.py run of config + extra (bench/train_speed.py) on random tokens (made on first
    use, kept in --work) -> tokens/s, MFU and peak memory against the planner's prediction for that
    mode on one GPU."""
    data_dir = Path(a.work) / f"data_{a.model}"
    train_speed.make_data(data_dir, settings["data_tokens"])
    if "--stage=sft" in extra:
        sft_dir = Path(a.work) / f"sft_{a.model}"
        make_sft_data(data_dir, sft_dir, settings["seq"], settings["data_tokens"])
        data_dir = sft_dir
    batch = settings["batch"]
    seq = settings["seq"]
    compile = device.type == "cuda"
    extra = [f"--device={device.type}", f"--batch_size={batch}", f"--block_size={seq}",
             f"--total_batch_tokens={batch * seq}", *extra]
    cfg = config.parse_args(train.TrainConfig(), [str(ROOT / settings["config"]), *extra],
                            config_file=True)
    vocab = cfg.vocab_size or llm.model_config(cfg.model).vocab_size
    with torch.device("meta"):
        model = llm.LLM(plan.model_config(cfg, vocab))
    predicted = plan.predicted_peak(cfg, model, gpus=1, compiled=compile)
    n_rows = settings["warmup"] + settings["steps"]
    out_dir = Path(a.work) / f"train_{case.replace(' ', '_').replace('.', '')}"
    rows = train_speed.run(tree=ROOT, config=settings["config"], compile=compile,
                           data_dir=data_dir, out_dir=out_dir, vocab_size=vocab, n_steps=n_rows,
                           extra=extra, timeout=max(1.0, min(settings["run_seconds"],
                                                             budget.left())))
    step_ms, tok_s, mfu, mem = train_speed.summary(rows[settings["warmup"]:])
    result = f"{tok_s:,.0f} tokens/s, {step_ms:.0f} ms/step" + (f", MFU {mfu:.1%}" if mfu else "")
    if device.type == "cuda":
        against = f"peak {mem:.1f} GB vs planned {predicted / 1e9:.1f} GB " \
                  f"({mem * 1e9 / predicted:.2f}x)"
    else:   # train.py logs the process's max RSS off CUDA: not the planner's quantity
        against = f"max RSS {mem:.2f} GB (planned {predicted / 1e9:.3f} GB on a GPU)"
    note = f"{'compiled' if compile else 'eager'}, {batch} x {seq} tokens, " \
           f"median of {settings['steps']} steps after {settings['warmup']}"
    return ("train", case, result, against, note)


# ---- 3. decode
def decode_row(a, settings, device):
    """Greedy decode at batch 1 of a random model: tokens/s against bandwidth / weight bytes."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = llm.LLM(llm.model_config(a.model)).to(dtype).eval()
    compile = device.type == "cuda"
    if compile:
        generate.compile_decode(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    n = settings["decode_tokens"]
    for _ in generate.generate(model, prompt, 8, temperature=0):   # compiles, warms up
        pass
    sync(device)
    t0 = time.perf_counter()
    for _ in generate.generate(model, prompt, n, temperature=0):
        pass
    sync(device)
    tok_s = n / (time.perf_counter() - t0)
    # each token reads every weight once except the embedding table (one row of it)
    weight_bytes = dtype.itemsize * (model.num_params() - model.embed_tokens.weight.numel())
    result = f"{tok_s:,.1f} tokens/s at batch 1 ({n} tokens after a 16-token prompt)"
    bandwidth = plan.hbm_bandwidth(torch.cuda.get_device_name(device)) \
        if device.type == "cuda" else None
    against = "-"
    if bandwidth:
        limit = bandwidth / weight_bytes
        against = f"limit {limit:,.0f} tokens/s = {bandwidth / 1e12:.2f} TB/s / " \
                  f"{weight_bytes / 1e9:.2f} GB of weights ({tok_s / limit:.0%})"
    note = f"{'compiled' if compile else 'eager'} decode, {str(dtype).split('.')[-1]}"
    return ("decode", f"{a.model}, batch 1", result, against, note)


def table(rows, header):
    lines = [header, "", "| part | case | result | against | note |",
             "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--model", default="1b", choices=list(SETTINGS))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check.md"),
                   help="the markdown table is written here too")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole run")
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "gpu_check"),
                   help="random-token data and the training runs' out dirs")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA GPU; on a machine without "
                         "one run with --device cpu --model tiny")
    settings = SETTINGS[a.model]
    budget = Budget(a.budget, device)
    rows = []
    shape = settings["attention"]
    reps = settings["reps"]
    attention = {}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)   # bench/out is not in a fresh clone
    # The training step first: it is the number kiln knows least, and its subprocesses start while
    # this process holds no GPU memory. cuDNN attention last: a fault there poisons the process.
    for case, extra in (("plain", []), ("act. checkpointing", ["--activation_checkpointing=True"]),
                        ("packed SFT", ["--stage=sft"])):
        guarded(rows, "train", case, budget,
                lambda: train_row(case, extra, a, settings, device, budget))
    guarded(rows, "decode", f"{a.model}, batch 1", budget, lambda: decode_row(a, settings, device))
    guarded(rows, "attention", "FlexAttention, doc mask", budget,
            lambda: flex_row(shape, device, reps, compile=device.type == "cuda"))

    def reference():   # the float32 math reference once for the four backends
        attention.update(zip(("inputs", "dout", "ref"), attention_inputs(shape, device)))
        return ("attention", "float32 math reference", f"B {shape[0]}, T {shape[1]}, "
                f"{shape[2]} heads, {shape[3]} KV heads, head_dim {shape[4]}", "-", "ok")
    guarded(rows, "attention", "float32 math reference", budget, reference)
    for name in sorted(BACKENDS, key=lambda n: n == "cudnn"):
        guarded(rows, "attention", f"SDPA {name}", budget,
                lambda: sdpa_row(name, attention["inputs"], attention["dout"], attention["ref"],
                                 device, reps))
    attention.clear()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = f"gpu_check on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}, " \
             f"cuDNN {torch.backends.cudnn.version()}, --model {a.model}, " \
             f"{time.time() - budget.start:.0f} s; train.py's default attention_backends=" \
             f"{train.TrainConfig().attention_backends}"
    text = table(rows, header)
    print("\n" + text)
    common.write_atomic(Path(a.out), text.encode())
    return rows


if __name__ == "__main__":
    main()
