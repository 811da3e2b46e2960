"""Decode speed on CPU: kiln's generation (sample.generate_ids: generate.generate with its
preallocated KV cache, under inference_mode) against transformers' generate on the same model
exported with export_hf.py. Same settings on both sides: batch 1, greedy, use_cache,
--prompt_len random prompt tokens, exactly --new_tokens new tokens (no stop token), float32.

    python bench/bench_sample.py               # demo preset, 64 prompt + 128 new tokens, 9 rounds
    python bench/bench_sample.py --rounds 15 --hf_compile

Sides, run in turn every round, so a slow minute of the shared box hits them all: "HF" is
transformers' plain generate as shipped (its default dynamic cache, eager, under the no_grad that
generate sets itself); "HF inference_mode" is the same call inside torch.inference_mode(), as
kiln's sample.py runs (~10% faster); "kiln" is the default eager path; "kiln --compile" adds
generate.compile_decode (sample.py --compile); with --hf_compile, "HF compiled" is transformers'
own fast path, a static cache and a torch.compile'd forward, under inference_mode. Compile times
are printed, not timed; every side runs once before the first round. Prints each side's tokens/s
per round and the medians of the per-round ratios; checks that every side produced the same
tokens. Random weights: speed does not depend on the values.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # after the sys.path line: the repo root holds the modules
import export_hf
import generate
import llm
import sample


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="demo")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)   # a noisy shared box: a median of 9 is stable
    p.add_argument("--threads", type=int, default=1)  # 2 threads on a busy 2-core box: 20x slower
    p.add_argument("--hf_compile", action="store_true",
                   help="also time HF with a static cache + torch.compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()

    torch.manual_seed(0)
    model = llm.LLM(llm.model_config(args.preset)).eval()
    compiled = llm.LLM(model.config).eval()
    compiled.load_state_dict(model.state_dict())
    generate.compile_decode(compiled)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.save_checkpoint(Path(tmp) / "run", 0, model, {}, {"model": args.preset},
                                          {}, None)
        hf_dir = export_hf.export(ckpt, Path(tmp) / "hf")
        hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
        hf_compiled = None
        if args.hf_compile:
            hf_compiled = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    # (1, T), past any special token
    prompt = torch.randint(200, model.config.vocab_size, (1, args.prompt_len))
    n = args.new_tokens

    def kiln(m):
        def run():
            ids = sample.generate_ids(m, prompt[0].tolist(), n, temperature=0)
            return torch.tensor(list(ids))                                               # (n,)
        return run

    def hf_generate(m, mode=torch.no_grad, **kw):
        def run():
            with mode():
                out = m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 use_cache=True, eos_token_id=None, pad_token_id=0, **kw)
            return out[0, args.prompt_len:]                                                # (n,)
        return run

    print(f"{args.preset} preset, {model.num_params() / 1e6:.1f}M parameters, prompt "
          f"{args.prompt_len}, {n} new tokens, greedy, batch 1, {torch.get_num_threads()} threads")
    runs = {"HF": hf_generate(hf), "HF inference_mode": hf_generate(hf, torch.inference_mode),
            "kiln": kiln(model), "kiln --compile": kiln(compiled)}
    if hf_compiled is not None:
        hf_compiled.forward = torch.compile(hf_compiled.forward)
        runs["HF compiled"] = hf_generate(hf_compiled, torch.inference_mode,
                                          cache_implementation="static")
    ref = runs["HF"]()
    for name, fn in runs.items():  # warm-up: allocator, kernels, and the compiles
        t, _ = timed(fn)
        if "compile" in name:
            print(f"{name}: first call (compiles) {t:.1f} s")
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        line = f"round {r}:"
        for name, fn in runs.items():
            t, ids = timed(fn)
            times[name].append(t)
            same = torch.equal(ids, ref)
            line += f"  {name} {n / t:6.1f} tok/s" + ("" if same else " (TOKENS DIFFER)")
        print(line, flush=True)

    def speedup(a, b):
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    print(f"median speed-up kiln / HF generate: {speedup('kiln', 'HF'):.2f}x (goal >= 1.5x)")
    print("median speed-up kiln / HF generate under inference_mode: "
          f"{speedup('kiln', 'HF inference_mode'):.2f}x")
    print(f"median speed-up kiln --compile / HF generate: {speedup('kiln --compile', 'HF'):.2f}x")
    if hf_compiled is not None:
        print("median speed-up kiln --compile / HF compiled: "
              f"{speedup('kiln --compile', 'HF compiled'):.2f}x")
        print(f"median speed-up HF compiled / HF generate: {speedup('HF compiled', 'HF'):.2f}x")


if __name__ == "__main__":
    main()
