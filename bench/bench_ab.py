"""Wall time of one kiln command in this checkout against the same command in another git revision.

    python bench/bench_ab.py --base HEAD~1 --rounds 5 -- eval_mmlu.py --ckpt out/demo --data DIR --limit 20
    python bench/bench_ab.py --base HEAD~1 -- data.py --input DIR --tokenizer TOK --out {out}

The base revision is checked out into a temporary git worktree; the command runs there and here in turn
(base, new, base, new, ...), each a fresh process with this checkout's Python, so start-up and imports
count. Give paths as absolute ones (the base runs in another folder); `{out}` becomes a fresh empty folder
per run. Prints each round and the median of the per-round ratios base time / new time (above 1: the working
tree is faster). Whole processes, not functions: a new module layout is compared by what a user waits for.
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree, command, scratch):
    out = Path(scratch) / "out"
    shutil.rmtree(out, ignore_errors=True)
    args = [a.replace("{out}", str(out)) for a in command]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: {' '.join(args)} failed in {tree}:\n{proc.stderr[-2000:]}")
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision to compare against")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS... (run in each tree)")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("error: give the command after --, e.g. -- eval_mmlu.py --limit 5")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for shared in ("data", "out"):  # prepared data and checkpoints the command may name
                if (ROOT / shared).exists():
                    (base / shared).symlink_to(ROOT / shared)
            times = {"base": [], "new": []}
            for r in range(args.rounds):
                times["base"].append(run(base, command, tmp))
                times["new"].append(run(ROOT, command, tmp))
                print(f"round {r}: base {times['base'][-1]:.2f} s, new {times['new'][-1]:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    ratio = statistics.median(b / n for b, n in zip(times["base"], times["new"]))
    print(f"median base/new time ratio over {args.rounds} rounds: {ratio:.3f} (above 1: new is faster)")


if __name__ == "__main__":
    main()
