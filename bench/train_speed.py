"""Training speed of train.py for a config: tokens/s and MFU, torch.compile off (A) against on (B),
or this checkout against another git revision (--base), both compiled.

    python bench/train_speed.py --config config/demo.py --steps 6            # CPU, a few minutes
    python bench/train_speed.py --config config/pretrain_1b.py --steps 20    # one GPU: MFU vs peak
    python bench/train_speed.py --config config/pretrain_1b.py --steps 20 -- --batch_size=4
    python bench/train_speed.py --config config/demo.py --base HEAD~1 --pairs 4   # A HEAD~1, B here

Each run is the real train.py loop in a fresh process, on random tokens with the config's model,
batch and vocabulary size (overrides after `--` go to train.py); it is stopped (SIGKILL, nothing
saved) once it has logged --warmup + --steps steps. With --base the revision is checked out into a
temporary git worktree (as bench/bench_ab.py does) and its train.py runs there, with this checkout's
Python and data. Runs alternate A B A B ... (--pairs pairs); the report gives each run's median
step, the medians per variant, and the median of the pairwise B/A speed ratios.
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bpe  # after the sys.path line above: the repo root holds the modules
import config
import llm
import shards
import train


def make_data(out, tokens=2_000_000):
    """A small tokenizer and shards of random tokens: speed does not depend on which tokens."""
    if (out / "train_000000.bin").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ("".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(20000))
    (out / "text.txt").write_text(" ".join(words))
    tok = bpe.train([str(out / "text.txt")], 512, out)
    for split, n in (("train", tokens), ("val", tokens // 10)):
        ids = rng.integers(len(bpe.SPECIAL_TOKENS), tok.vocab_size, n)
        shards.write_shard(out / f"{split}_000000.bin", ids, tok.vocab_size, tok.hash)


@contextmanager
def worktree(rev):
    """A temporary checkout of git revision rev (None: nothing, yields None)."""
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True)


def run(tree, config, compile, data_dir, out_dir, vocab_size, n_steps, extra, timeout):
    """One train.py process of the checkout in tree -> the step rows it logged (killed once it has
    n_steps of them)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "train.py", config, f"--data_dir={data_dir}", f"--out_dir={out_dir}",
           f"--vocab_size={vocab_size}", f"--compile={compile}", "--init_from=scratch",
           "--eval_interval=0", "--log_interval=1", "--max_iters=100000",
           "--ckpt_interval=100000", "--wandb_log=False", *extra]
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    log = Path(out_dir) / "log.jsonl"
    t0 = time.time()
    rows = []
    while len(rows) < n_steps:
        if proc.poll() is not None:
            raise RuntimeError(f"train.py exited with {proc.returncode}: "
                               f"{proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"run took more than {timeout} s; lower --steps or raise --timeout")
        time.sleep(0.2)
        if log.exists():
            rows = [r for r in map(json.loads, log.read_text().splitlines()[:-1]) if "dt_ms" in r]
    proc.kill()
    proc.wait()
    return rows[:n_steps]


def summary(rows):
    """(median ms per step, median tokens/s, median MFU or None, peak memory GB) of one run."""
    mfu = [r["mfu"] for r in rows if r["mfu"] is not None]
    return (statistics.median(r["dt_ms"] for r in rows),
            statistics.median(r["tokens_per_s"] for r in rows),
            statistics.median(mfu) if mfu else None, rows[-1]["mem_gb"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/demo.py")
    p.add_argument("--steps", type=int, default=6, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=3,
                   help="steps dropped at the start of each run (compilation)")
    p.add_argument("--pairs", type=int, default=2, help="A B pairs")
    p.add_argument("--base", help="git revision: compare it (A) with this checkout (B), compiled")
    p.add_argument("--compile", choices=("True", "False"), default="True",
                   help="with --base: compile both (default) or neither")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    a, extra = p.parse_known_args()
    extra = [e for e in extra if e != "--"]
    # The config and its overrides, read as train.py reads them: the vocabulary of the real run.
    cfg = config.parse_args(train.TrainConfig(), [str(ROOT / a.config), *extra], config_file=True)
    vocab = cfg.vocab_size or llm.model_config(cfg.model).vocab_size
    data_dir = ROOT / "bench" / "out" / "train_speed_data"
    make_data(data_dir)
    with worktree(a.base) as base:
        if base:   # (name, tree, compile) of A and B
            variants = [(f"base {a.base}", base, a.compile), ("this checkout", ROOT, a.compile)]
        else:
            variants = [("compile=False", ROOT, False), ("compile=True", ROOT, True)]
        results = {name: [] for name, _, _ in variants}
        for pair in range(a.pairs):
            for i, (name, tree, compile) in enumerate(variants):
                out_dir = ROOT / "bench" / "out" / f"train_speed_{i}"
                rows = run(tree, a.config, compile, data_dir, out_dir, vocab, a.warmup + a.steps,
                           extra, a.timeout)
                step_ms, tok_s, mfu, mem = summary(rows[a.warmup:])
                results[name].append((step_ms, tok_s, mfu, mem))
                print(f"pair {pair} {name:<20}: {step_ms:8.1f} ms/step  {tok_s:12,.0f} tokens/s  "
                      f"MFU {f'{mfu:.1%}' if mfu else '-':>6}  peak mem {mem:.2f} GB", flush=True)
    report(a, extra, results)


def report(a, extra, results):
    """Medians per variant and the median of the pairwise B/A speed ratios."""
    print(f"\n{a.config} {' '.join(extra)}: median of {a.steps} steps per run after {a.warmup} "
          "warm-up steps" + f", compile={a.compile}" * bool(a.base))
    for name, runs in results.items():
        mfu = [r[2] for r in runs if r[2] is not None]
        mfu_text = f"{statistics.median(mfu):.1%}" if mfu else "- (no known peak for this device)"
        print(f"  {name:<20}: {statistics.median(r[1] for r in runs):12,.0f} tokens/s   "
              f"MFU {mfu_text}")
    (name_a, runs_a), (name_b, runs_b) = results.items()
    ratios = [b[1] / a_[1] for a_, b in zip(runs_a, runs_b)]
    print(f"  {name_b} / {name_a} speed: median of pairwise ratios "
          f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
