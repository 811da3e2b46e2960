"""MMLU scoring speed on CPU: eval_mmlu.evaluate (a subject's shared prefix run once, length-sorted
batches, one forward pass per question, the last MLP and lm_head only at the answer position)
against a naive loop (one unbatched forward pass per question per choice, full logits).

    python bench/bench_mmlu.py          # all 14,042 test questions of ../shared/data/mmlu, 0-shot
    python bench/bench_mmlu.py --limit 2 --subset 1 --rounds 2    # quick: 2 questions per subject

The demo preset with random weights (speed does not depend on the values) and a 4096-token BPE
trained on tiny-shakespeare (cached in bench/out/). The speed-up is the median of per-pair ratios
over --rounds alternating runs (naive, batched, naive, ...) on the first --subset questions of each
subject (a small subset pads more than the full run, whose length-sorted batches hold near-equal
lengths); then one timed full run.
"""
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bpe  # after the sys.path line: the repo root holds the modules
import config
import eval_mmlu
import llm
import mmlu

SHARED = ROOT.parent / "shared" / "data"


@torch.no_grad()
def naive(model, tok, tests):
    """One forward pass per (question, choice) on context + continuation; log_softmax over every
    position."""
    out = []
    for subject, items in tests.items():
        for item in items:
            ctx, conts = eval_mmlu.encode(tok, subject, item, [], "letter", False)
            lls = []
            for cont in conts:
                ids = (ctx + cont)[-model.config.max_seq_len - 1:]
                logits, _ = model(torch.tensor([ids[:-1]]))                       # (1, T, V)
                lp = torch.log_softmax(logits[0].float(), dim=-1)                   # (T, V)
                first = len(ids) - 1 - len(cont)  # the position that predicts cont[0]
                lls.append(sum(lp[first + j, t].item() for j, t in enumerate(cont)))
            out.append(lls)
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


@dataclass
class Args:
    limit: int | None = None  # the first N test questions per subject for the full run
    subset: int = 2           # questions per subject for the A/B comparison
    rounds: int = 3
    batch_size: int = 16
    threads: int = 2          # torch CPU threads


def main():
    args = config.parse_args(Args(), doc=__doc__)
    torch.set_num_threads(args.threads)
    if not (SHARED / "mmlu").is_dir():
        sys.exit(f"{SHARED / 'mmlu'} is not there; this benchmark needs ../shared/data beside the "
                 "checkout")
    tok_dir = ROOT / "bench" / "out" / "tok4096"
    tok = bpe.Tokenizer.load(tok_dir) if (tok_dir / "tokenizer.json").is_file() else \
        bpe.train([str(SHARED / "tinyshakespeare.txt")], 4096, tok_dir)
    torch.manual_seed(0)
    model = llm.LLM(llm.model_config("demo", vocab_size=tok.vocab_size)).eval()
    tests = mmlu.load_mmlu(SHARED / "mmlu", "test")
    subset = {s: items[:args.subset] for s, items in tests.items()}
    n_sub = sum(map(len, subset.values()))

    ratios = []
    for r in range(args.rounds):  # alternate A B A B so drift in machine load hits both alike
        t_naive, ref = timed(lambda: naive(model, tok, subset))
        t_ours, res = timed(lambda: eval_mmlu.evaluate(model, tok, subset, {},
                                                       batch_size=args.batch_size))
        diff = max(abs(a - b) for q, lls in zip(res["questions"], ref)
                   for a, b in zip(q["loglik"], lls))
        ratios.append(t_naive / t_ours)
        print(f"round {r}: naive {n_sub / t_naive:.1f} q/s, batched {n_sub / t_ours:.1f} q/s, "
              f"ratio {ratios[-1]:.2f}, max |loglik diff| {diff:.1e}")
    print(f"median speed-up over the naive loop: {statistics.median(ratios):.2f}x ({n_sub} "
          f"questions, {args.rounds} rounds)")

    full = {s: items[:args.limit] for s, items in tests.items()}
    n = sum(map(len, full.values()))
    t, res = timed(lambda: eval_mmlu.evaluate(model, tok, full, {}, batch_size=args.batch_size))
    print(f"full run: {n} questions, 0-shot, demo preset ({model.num_params():,} params), "
          f"{torch.get_num_threads()} threads: {t:.1f} s, {n / t:.1f} questions/s "
          f"({res['truncated']} prompts truncated to {model.config.max_seq_len} tokens)")


if __name__ == "__main__":
    main()
