"""Decode speed of this checkout's generation against another revision's, in one process: for
work on llm.py and generate.py.

    python bench/bench_decode_ab.py                  # working tree vs HEAD
    python bench/bench_decode_ab.py --base 58dcc0f --rounds 15 --threads 1
    python bench/bench_decode_ab.py --base 58dcc0f --compile     # both sides' compiled decode steps

Loads each side's llm.py (and generate.py where the revision has one) as separate modules, builds
the same random model in each, checks that both generate the same greedy tokens, then alternates
them (base, new, base, new, ...) and prints the median of the per-round speed ratios new / base.
Batch 1, --prompt_len random prompt tokens, --new_tokens new tokens, under inference_mode. A
revision without generate.py (58dcc0f and before) generates with LLM.generate and compiles with
LLM.compile_decode.
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
NAMES = ("llm", "generate")


def revision_sources(rev):
    """{module name: source} of llm.py and generate.py at git revision rev (None: the working
    tree)."""
    sources = {}
    for name in NAMES:
        if rev is None:
            path = ROOT / f"{name}.py"
            if path.exists():
                sources[name] = path.read_text()
            continue
        shown = subprocess.run(["git", "show", f"{rev}:{name}.py"], cwd=ROOT, capture_output=True,
                               text=True)
        if shown.returncode == 0:
            sources[name] = shown.stdout
    if "llm" not in sources:
        sys.exit(f"error: no llm.py at revision {rev!r}; pass a kiln revision with --base")
    return sources


def load_side(sources, tmp, tag):
    """Import one side's modules under their own names (generate.py's `from llm import ...` then
    binds that side's llm), then take them out of sys.modules again for the other side."""
    modules = {}
    saved = {name: sys.modules.pop(name, None) for name in NAMES}
    try:
        for name, source in sources.items():
            path = Path(tmp) / f"{name}_{tag}.py"
            path.write_text(source)
            spec = importlib.util.spec_from_file_location(name, path)
            modules[name] = importlib.util.module_from_spec(spec)
            sys.modules[name] = modules[name]
            spec.loader.exec_module(modules[name])
    finally:
        for name in NAMES:
            sys.modules.pop(name, None)
            if saved[name] is not None:
                sys.modules[name] = saved[name]
    return modules


def runner(modules, model, prompt, new_tokens):
    """A function that decodes new_tokens greedy tokens with this side's generation."""
    gen = modules.get("generate")

    def run():
        with torch.inference_mode():
            if gen is None:
                steps = model.generate(prompt, new_tokens, temperature=0)
            else:
                steps = gen.generate(model, prompt, new_tokens, temperature=0)
            return torch.cat(list(steps))                                           # (new_tokens,)
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="HEAD", help="git revision whose generation is the baseline")
    p.add_argument("--preset", default="demo")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="compile both sides' decode steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sides = {args.base: load_side(revision_sources(args.base), tmp, "base"),
                 "working tree": load_side(revision_sources(None), tmp, "new")}
    runs = {}
    prompt = None
    for name, modules in sides.items():
        llm = modules["llm"]
        torch.manual_seed(0)  # the same weights in both
        model = llm.LLM(llm.model_config(args.preset)).eval()
        if args.compile and "generate" in modules:
            modules["generate"].compile_decode(model)
        elif args.compile:
            model.compile_decode()
        if prompt is None:
            prompt = torch.randint(200, model.config.vocab_size, (1, args.prompt_len))  # (1, T)
        runs[name] = runner(modules, model, prompt, args.new_tokens)
    t0 = time.perf_counter()
    tokens = [run() for run in runs.values()]   # also the warm-up (and the compiles)
    print(f"{args.preset} preset, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} thread(s), compile {args.compile} "
          f"(warm-up {time.perf_counter() - t0:.1f} s); same tokens: {torch.equal(*tokens)}")
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        speeds = [f"{n} {args.new_tokens / t[-1]:6.1f} tok/s" for n, t in times.items()]
        print(f"round {r}: " + "  ".join(speeds), flush=True)
    ratio = statistics.median(b / n for b, n in zip(times[args.base], times["working tree"]))
    print(f"median speed-up working tree / {args.base}: {ratio:.3f}x")


if __name__ == "__main__":
    main()
