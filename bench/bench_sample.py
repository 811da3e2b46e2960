"""Decode speed on CPU: kiln's generation (sample.generate_ids: llm.generate with its preallocated KV cache, under
inference_mode) against transformers' generate on the same model exported with export_hf.py. Same settings on
both sides: batch 1, greedy, use_cache, --prompt_len random prompt tokens, exactly --new_tokens new tokens (no
stop token), float32.

    python bench/bench_sample.py                       # demo preset, 64 prompt + 128 new tokens, 9 pairs
    python bench/bench_sample.py --rounds 15 --threads 2

Random weights (speed does not depend on the values). Alternates HF, kiln, HF, kiln, ... and prints each side's
tokens/s and the median of the per-pair speed ratios (kiln / HF); "llm.generate" is the bare generator under
no_grad, for reference. Also checks that every side produced the same tokens.
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
import common  # after the sys.path line: the repo root holds the modules
import export_hf
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
    p.add_argument("--rounds", type=int, default=9)   # a noisy shared box: the median of 9 pairs is stable
    p.add_argument("--threads", type=int, default=1)  # 2 threads on a busy 2-core box: 20x slower
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()

    torch.manual_seed(0)
    model = llm.LLM(llm.model_config(args.preset)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = common.save_checkpoint(Path(tmp) / "run", 0, model, {}, {"model": args.preset}, {}, None)
        hf = LlamaForCausalLM.from_pretrained(export_hf.export(ckpt, Path(tmp) / "hf")).eval()
    prompt = torch.randint(len(llm.PRESETS) + 100, model.config.vocab_size, (1, args.prompt_len))  # (1, T)
    n = args.new_tokens

    def run_kiln():
        return torch.tensor(list(sample.generate_ids(model, prompt[0].tolist(), n, temperature=0)))  # (n,)

    def run_bare():
        return torch.cat(list(model.generate(prompt, n, temperature=0)))                  # (n,)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                              eos_token_id=None, pad_token_id=0)
        return out[0, args.prompt_len:]                                                  # (n,)

    print(f"{args.preset} preset, {model.num_params() / 1e6:.1f}M parameters, prompt {args.prompt_len}, "
          f"{n} new tokens, greedy, batch 1, {torch.get_num_threads()} threads")
    runs = {"HF": run_hf, "kiln": run_kiln, "llm.generate": run_bare}
    ref = run_hf()  # also the warm-up: allocator, kernels
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        line = f"round {r}:"
        for name, fn in runs.items():
            t, ids = timed(fn)
            times[name].append(t)
            line += f"  {name} {n / t:6.1f} tok/s" + ("" if torch.equal(ids, ref) else " (TOKENS DIFFER)")
        print(line, flush=True)
    for name in ("kiln", "llm.generate"):
        ratio = statistics.median(h / k for h, k in zip(times["HF"], times[name]))
        print(f"median speed-up {name} / HF generate: {ratio:.2f}x" + " (goal >= 1.5x)" * (name == "kiln"))

if __name__ == "__main__":
    main()
