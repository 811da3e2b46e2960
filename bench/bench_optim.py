"""Muon vs AdamW on a fixed CPU task (issue 16): held-out loss at equal steps and equal time.

    python bench/bench_optim.py                        # the BENCHMARKS.md run (~800 CPU seconds)
    python bench/bench_optim.py --steps 4 --seeds 1 --adamw_lrs 3e-3 --muon_lrs 0.02    # smoke
    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/bench_optim.py --fsdp_cost

The task: `make demo`'s model (the demo preset at n_layer 4, d_model 128, block 128) with a
2,048-token BPE trained here on ../shared/data/gutenberg (7 books, cut as data.py cuts them); the
last 5% of each book (from a paragraph start) is held out. 8,192 tokens per step: 64 windows of 128
at seeded random offsets, the same for both optimizers of a seed. Cosine schedule to lr/10 after
5 warmup steps, weight decay 0.1, grad clip 1. The loop is a minimal one
in this file with kiln's llm.LLM, optim.make_optimizer and plan.get_lr (no train.py: no data
loader, no checkpoints, nothing else timed).

1. Sweep on seed 0: AdamW's learning_rate over --adamw_lrs, Muon's muon_lr over --muon_lrs (its
   AdamW part at learning_rate 3e-3, `make demo`'s).
2. Every seed at each optimizer's best rate, and 3. Muon again for steps x (AdamW's time per step /
   Muon's) steps, with its schedule ending there: both optimizers get the same time budget.
Runs go --workers at a time (one thread each, AdamW beside Muon), so each run's time is its
process's CPU time, not wall time, which on a shared machine measures the neighbours. Both run the
same forward and backward; the step-time ratio is the sweep's median forward+backward plus each
optimizer's median step, timed alone. Held-out loss: every held-out window (74k tokens) after the
last step. Results go to bench/out/optim/results.json after each run; a re-run skips the runs it
holds (delete it after changing the task).
--fsdp_cost (under torchrun, gloo): the optimizer step alone, AdamW vs Muon, with and without FSDP2.
"""
import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bpe  # after the sys.path line above: the repo root holds the modules
import common
import data
import llm
import optim
import plan
import train

BOOKS = ROOT.parent / "shared" / "data" / "gutenberg"
OUT = ROOT / "bench" / "out" / "optim"
VOCAB = 2048
BLOCK = 128
BATCH = 64            # x BLOCK = 8,192 tokens per step
WARMUP = 5            # steps
MUON_ADAMW_LR = 3e-3  # Muon runs: AdamW's rate for embeddings, lm_head and norms


def make_data():
    """-> (train tokens, held-out tokens) as uint16 arrays, made once into bench/out/optim/."""
    cache = OUT / f"tokens_{VOCAB}.npz"
    if cache.exists():
        saved = np.load(cache)
        return saved["train"], saved["val"]
    OUT.mkdir(parents=True, exist_ok=True)
    train_texts, val_texts = [], []
    for book in sorted(BOOKS.glob("*.txt")):
        text, _ = data.clean(book.read_text(encoding="utf-8", errors="replace"))
        cut = text.index("\n\n", int(len(text) * 0.95))
        train_texts.append(text[:cut])
        val_texts.append(text[cut:].strip())
    (OUT / "train.txt").write_text("\n\n".join(train_texts))
    tok = bpe.train([str(OUT / "train.txt")], VOCAB, OUT / "tok")
    encoded = {}
    for split, texts in (("train", train_texts), ("val", val_texts)):   # <|bos|> + each book
        ids = [[tok.bos_id] + ids for ids in tok.encode_batch(texts)]
        encoded[split] = np.concatenate(ids).astype(np.uint16)
    np.savez(cache, **encoded)
    return encoded["train"], encoded["val"]


def make_config(kind, lr, steps):
    """A TrainConfig with the bench's settings; lr is learning_rate (AdamW) or muon_lr (Muon)."""
    adamw_lr = lr if kind == "adamw" else MUON_ADAMW_LR
    return train.TrainConfig(optimizer=kind, learning_rate=adamw_lr, min_lr=adamw_lr / 10,
                             muon_lr=lr if kind == "muon" else 0.0, max_iters=steps,
                             warmup_iters=WARMUP, schedule="cosine", weight_decay=0.1,
                             grad_clip=1.0)


def make_model(seed):
    torch.manual_seed(seed)
    return llm.LLM(llm.model_config("demo", vocab_size=VOCAB, n_layer=4, d_model=128))


def held_out_loss(model, val):
    """Mean loss over all non-overlapping held-out windows."""
    n = (len(val) - 1) // BLOCK
    xy = torch.from_numpy(val[:n * BLOCK + 1].astype(np.int64))
    x = xy[:-1].view(n, BLOCK)
    y = xy[1:].view(n, BLOCK)
    model.eval()
    with torch.no_grad():
        total = sum(model(x[i:i + BATCH], y[i:i + BATCH], reduction="sum")[1].item()
                    for i in range(0, n, BATCH))
    model.train()
    return total / (n * BLOCK)


def run(kind, lr, seed, steps):
    """One training run, in a worker process -> {kind, lr, seed, steps, cpu_s, wall_s, opt_s,
    loss}: cpu_s is the process's CPU time in training steps, opt_s the optimizer's part."""
    torch.set_num_threads(1)
    tokens, val = make_data()
    cfg = make_config(kind, lr, steps)
    model = make_model(seed)
    opt = optim.make_optimizer(cfg, model)
    # The seed's batches: the same windows for both optimizers, whatever the step count.
    starts = np.random.default_rng(seed).integers(0, len(tokens) - BLOCK - 1, (steps, BATCH))
    offsets = np.arange(BLOCK + 1)
    cpu = 0.0
    opt_cpu = 0.0
    wall = time.time()
    for step in range(steps):
        t0 = time.process_time()
        xy = torch.from_numpy(tokens[starts[step][:, None] + offsets].astype(np.int64))
        for group in opt.param_groups:
            group["lr"] = plan.get_lr(step, cfg)
        _, loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        t1 = time.process_time()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.process_time()
        cpu += t2 - t0
        opt_cpu += t2 - t1
    return {"kind": kind, "lr": lr, "seed": seed, "steps": steps, "cpu_s": cpu,
            "wall_s": time.time() - wall, "opt_s": opt_cpu, "loss": held_out_loss(model, val)}


def run_all(jobs, results, pool):
    """Run the jobs [(kind, lr, seed, steps)] not yet in results in the pool (one thread each),
    appending each result and saving them all after each (a re-run of the bench resumes)."""
    done = {(r["kind"], r["lr"], r["seed"], r["steps"]) for r in results}
    futures = [pool.submit(run, *job) for job in jobs if job not in done]
    for future in as_completed(futures):
        row = future.result()
        results.append(row)
        common.write_json(OUT / "results.json", results)
        print(f"{row['kind']:5} lr {row['lr']:<6g} seed {row['seed']} {row['steps']:4d} steps: "
              f"{row['cpu_s']:5.0f} CPU s ({row['cpu_s'] / row['steps'] * 1000:4.0f} ms/step, "
              f"optimizer {row['opt_s'] / row['steps'] * 1000:3.0f}), {row['wall_s']:5.0f} s wall;"
              f" held-out loss {row['loss']:.4f}", flush=True)


def benchmark(a):
    tokens, val = make_data()
    print(f"{len(tokens):,} train and {len(val):,} held-out tokens; {a.steps} steps of "
          f"{BATCH * BLOCK:,} tokens", flush=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    kinds = ("adamw", "muon")
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        sweep = list(zip_longest(a.adamw_lrs, a.muon_lrs))   # 1. the sweep, AdamW and Muon paired
        run_all([(kind, lr, 0, a.steps) for pair in sweep for kind, lr in zip(kinds, pair)
                 if lr is not None], results, pool)
        ours = [r for r in results if r["steps"] == a.steps and r["seed"] == 0]
        best = {kind: min((r for r in ours if r["kind"] == kind and r["lr"] in lrs),
                          key=lambda r: r["loss"])["lr"]
                for kind, lrs in zip(kinds, (a.adamw_lrs, a.muon_lrs))}
        # Both run the same forward and backward: their step times differ by the optimizer step,
        # which is timed alone (the CPU is shared: the whole step's time is noisier than that).
        base = statistics.median((r["cpu_s"] - r["opt_s"]) / r["steps"] for r in ours)
        step_s = {kind: base + statistics.median(r["opt_s"] / r["steps"] for r in ours
                                                 if r["kind"] == kind) for kind in kinds}
        equal_time = round(a.steps * step_s["adamw"] / step_s["muon"])
        jobs = []                                            # 2. all seeds, 3. Muon in AdamW's time
        for seed in range(a.seeds):
            jobs += [("adamw", best["adamw"], seed, a.steps), ("muon", best["muon"], seed, a.steps),
                     ("muon", best["muon"], seed, equal_time)]
        run_all(list(dict.fromkeys(jobs)), results, pool)
    report(results, best, a.steps, equal_time, step_s, a.seeds)


def report(results, best, steps, equal_time, step_s, seeds):
    """The table for BENCHMARKS.md and the issue's verdict."""
    def pick(kind, seed, n):
        return next(r for r in results if (r["kind"], r["lr"], r["seed"], r["steps"]) ==
                    (kind, best[kind], seed, n))
    print(f"\nsweep, seed 0, {steps} steps (held-out loss):")
    for kind in ("adamw", "muon"):
        rows = sorted((r for r in results if (r["kind"], r["seed"], r["steps"]) ==
                       (kind, 0, steps)), key=lambda r: r["lr"])
        print(f"  {kind}: " + ", ".join(f"lr {r['lr']:g}: {r['loss']:.4f}" for r in rows))
    print(f"best: AdamW learning_rate {best['adamw']:g}, Muon muon_lr {best['muon']:g}; CPU "
          f"time per step (sweep medians) {step_s['adamw'] * 1000:.0f} ms AdamW, "
          f"{step_s['muon'] * 1000:.0f} ms Muon ({step_s['muon'] / step_s['adamw']:.3f}x): "
          f"AdamW's time = {equal_time} Muon steps")
    print(f"| seed | AdamW, {steps} steps | Muon, {steps} steps | Muon, {equal_time} steps "
          "(AdamW's CPU time) |")
    print("|---|---|---|---|")
    wins = 0
    for seed in range(seeds):
        a, m, t = (pick(kind, seed, n) for kind, n in
                   (("adamw", steps), ("muon", steps), ("muon", equal_time)))
        wins += t["loss"] < a["loss"]
        print(f"| {seed} | {a['loss']:.4f} ({a['cpu_s']:.0f} s) | {m['loss']:.4f} "
              f"({m['cpu_s']:.0f} s) | {t['loss']:.4f} ({t['cpu_s']:.0f} s) |")
    verdict = "Muon wins" if wins == seeds else "AdamW stays the default"
    print(f"Muon lower at equal time in {wins} of {seeds} seeds: {verdict}")


def fsdp_cost(steps=20):
    """Under torchrun (gloo): median optimizer step, ms, for AdamW and Muon with FSDP2 and Muon
    replicated (as under DDP), on the bench's model. Gradients are constant: only time matters."""
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for kind, fsdp in (("adamw", True), ("muon", True), ("muon", False), ("adamw", False)):
        model = make_model(0)
        if fsdp:
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        opt = optim.make_optimizer(make_config(kind, 0.02 if kind == "muon" else 3e-3, 1),
                                   model)
        times = []
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.full_like(p, 1e-3)
            dist.barrier()
            t0 = (time.perf_counter(), time.process_time())
            opt.step()
            times.append((time.perf_counter() - t0[0], time.process_time() - t0[1]))
        if dist.get_rank() == 0:
            wall, cpu = (statistics.median(t[i] for t in times) * 1000 for i in (0, 1))
            print(f"{kind:5} {'FSDP2' if fsdp else 'replicated':10}: optimizer step {wall:6.1f} "
                  f"ms wall, {cpu:6.1f} ms CPU (medians of {steps}, rank 0)", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="steps per run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--adamw_lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3])
    p.add_argument("--muon_lrs", type=float, nargs="+", default=[0.02, 0.04, 0.08])
    p.add_argument("--workers", type=int, default=3, help="runs at a time, one thread each")
    p.add_argument("--fsdp_cost", action="store_true", help="run under torchrun: see above")
    a = p.parse_args()
    if a.fsdp_cost:
        return fsdp_cost()
    benchmark(a)


if __name__ == "__main__":
    main()
