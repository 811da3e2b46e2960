"""Decode speed of this checkout's llm.py against another revision's, in one process: for work on generation.

    python bench/bench_decode_ab.py                  # working tree vs HEAD's llm.py
    python bench/bench_decode_ab.py --base HEAD~3 --rounds 21

Loads both llm.py files as separate modules, builds the same random demo model in each, checks that both
generate the same greedy tokens, then alternates them (base, new, base, new, ...) and prints the median of the
per-round speed ratios new / base. Batch 1, --prompt_len random prompt tokens, --new_tokens new tokens, eager,
under inference_mode, 1 thread (as bench/bench_sample.py).
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="HEAD", help="git revision whose llm.py is the baseline")
    p.add_argument("--preset", default="demo")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = subprocess.run(["git", "show", f"{args.base}:llm.py"], cwd=ROOT, capture_output=True, text=True)
    if source.returncode:
        sys.exit(f"error: cannot read llm.py at revision {args.base!r}: {source.stderr.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "llm_base.py").write_text(source.stdout)
        modules = {args.base: load_module("llm_base", Path(tmp) / "llm_base.py"),
                   "working tree": load_module("llm_new", ROOT / "llm.py")}
    models = {}
    for name, module in modules.items():
        torch.manual_seed(0)  # the same weights in both
        models[name] = module.LLM(module.model_config(args.preset)).eval()
    prompt = torch.randint(200, models[args.base].config.vocab_size, (1, args.prompt_len))

    def run(model):
        with torch.inference_mode():
            return torch.cat(list(model.generate(prompt, args.new_tokens, temperature=0)))   # (new_tokens,)

    base_tokens, new_tokens = (run(m) for m in models.values())
    print(f"{args.preset} preset, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} thread(s); same tokens: {torch.equal(base_tokens, new_tokens)}")
    times = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            run(model)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r}: " + "  ".join(f"{n} {args.new_tokens / t[-1]:6.1f} tok/s" for n, t in times.items()),
              flush=True)
    ratio = statistics.median(b / n for b, n in zip(times[args.base], times["working tree"]))
    print(f"median speed-up working tree / {args.base}: {ratio:.3f}x")


if __name__ == "__main__":
    main()
