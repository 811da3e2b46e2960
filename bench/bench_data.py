"""Prep throughput of `data.prepare` (read, clean, dedup, split, tokenize in worker processes, write
shards), alternating, median ratio printed. Two comparisons:

    python bench/bench_data.py                      # vs plain tokenizers encode_batch (goal >= 0.9)
    python bench/bench_data.py --ab /tmp/base --mb 25 --rounds 5   # vs another checkout's data.py
    python bench/bench_data.py --mb 10 --rounds 2   # quick look
    python bench/bench_data.py --tokenizer data/tok # your own tokenizer (default: 8192-token BPE)

The documents: the Gutenberg books (headers stripped) cut into ~4 KB pieces, as web documents are,
each made unique by a number in front (so dedup keeps them), written once to a jsonl file that the
prep reads (default 100 MB). Baseline: tokenizers.Tokenizer.encode_batch_fast over the same
documents in batches of ~4 MB, all cores (its own Rust threads). With --ab DIR both sides are
data.prepare, each run in a fresh process (this checkout's, then DIR's, and so on), timed around
the prepare call alone; both must write byte-identical shards.
"""
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bpe  # noqa: E402  (after the sys.path line: bench/ is not the repo root)
import config  # noqa: E402
import data  # noqa: E402


@dataclass
class Args:
    mb: float = 100                  # MB of documents
    rounds: int = 3                  # A/B pairs
    tokenizer: str | None = None     # a kiln tokenizer dir (default: 8192-token BPE trained here)
    workdir: str = str(ROOT / "bench" / "out" / "data")
    ab: str | None = None            # another checkout: compare its data.prepare with this one's
    workers: int | None = None       # prep worker processes (default: all cores)


def make_docs(target_mb):
    books = sorted((ROOT.parent / "shared" / "data" / "gutenberg").glob("[0-9]*.txt"))
    if not books:
        sys.exit("needs ../shared/data/gutenberg beside the checkout")
    pieces = []
    for b in books:
        text = data.clean(b.read_bytes().decode("utf-8"))[0]
        cur = []
        for p in text.split("\n\n"):
            cur.append(p)
            if sum(map(len, cur)) > 4000:
                pieces.append("\n\n".join(cur))
                cur = []
        pieces.append("\n\n".join(cur))
    docs = []
    size = 0
    while size < target_mb * 2**20:
        for p in pieces:
            doc = data.clean(f"{len(docs)} {p}")[0]  # what the prep would keep
            if len(doc) >= data.MIN_CHARS and size < target_mb * 2**20:
                docs.append(doc)
                size += len(doc.encode())
    return docs, size


def baseline(tok, docs):
    n = 0
    j = 0
    while j < len(docs):
        k = j
        chars = 0
        while k < len(docs) and chars < 1 << 22:
            chars += len(docs[k])
            k += 1
        batch = tok.tok.encode_batch_fast(docs[j:k], add_special_tokens=False)
        n += sum(len(e.ids) for e in batch)
        j = k
    return n


PREP = """
import resource, sys, time
sys.path.insert(0, {repo!r})
import data

def cpu():  # user + system seconds of this process and of its finished worker processes
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (0, -1)))
t, c = time.perf_counter(), cpu()
data.prepare([{docs!r}], {tok!r}, {out!r}, val_fraction=0.0005, workers={workers})
print(time.perf_counter() - t, cpu() - c)
"""


def prep_in_process(repo, docs_file, tok_dir, out, workers):
    """(wall seconds, CPU seconds) of repo's data.prepare, run in a fresh process with repo first
    on sys.path. CPU seconds include the worker processes: a fairer measure on a busy machine."""
    code = PREP.format(repo=str(repo), docs=str(docs_file), tok=str(tok_dir), out=str(out),
                       workers=workers)
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: the prep of {repo} failed:\n{r.stderr}")
    wall, cpu = map(float, r.stdout.strip().splitlines()[-1].split())
    return wall, cpu


def shard_digest(folder):
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.bin")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def run_ab(a, work, tok_dir, size, workers):
    """This checkout (A) against a.ab (B), alternating A B B A A B ... so that neither side always
    runs first; prints the per-round and median speed ratios (B's time / A's time)."""
    ratios = []
    cpu_ratios = []
    for r in range(a.rounds):
        sides = [(ROOT, "prep_a"), (Path(a.ab), "prep_b")]
        times = {}
        for repo, name in sides if r % 2 == 0 else sides[::-1]:
            times[name] = prep_in_process(repo, work / "docs.jsonl", tok_dir, work / name, workers)
        dt_a, cpu_a = times["prep_a"]
        dt_b, cpu_b = times["prep_b"]
        assert shard_digest(work / "prep_a") == shard_digest(work / "prep_b"), "shards differ"
        ratios.append(dt_b / dt_a)
        cpu_ratios.append(cpu_b / cpu_a)
        print(f"round {r}: this checkout {size / 2**20 / dt_a:.2f} MB/s ({dt_a:.2f} s, CPU "
              f"{cpu_a:.2f} s) | {a.ab} {size / 2**20 / dt_b:.2f} MB/s ({dt_b:.2f} s, CPU "
              f"{cpu_b:.2f} s) | speed ratio {dt_b / dt_a:.3f}, CPU {cpu_b / cpu_a:.3f}",
              flush=True)
    print(f"median speed ratio this/{a.ab}: wall {statistics.median(ratios):.3f}, CPU time "
          f"{statistics.median(cpu_ratios):.3f} (goal >= 0.97)")


def run_baseline(a, work, tok, docs, size, workers):
    ratios = []
    for r in range(a.rounds):
        t = time.perf_counter()
        n_a = baseline(tok, docs)
        dt_a = time.perf_counter() - t
        shutil.rmtree(work / "prep", ignore_errors=True)
        t = time.perf_counter()
        meta = data.prepare([str(work / "docs.jsonl")], tok, work / "prep", val_fraction=0.0005,
                            workers=workers)
        dt_b = time.perf_counter() - t
        # minus one <|bos|> per document
        n_b = meta["train_tokens"] + meta["val_tokens"] - meta["docs"]["docs_kept"]
        assert n_b == n_a, (n_a, n_b)
        ratios.append(dt_a / dt_b)
        print(f"round {r}: encode_batch {size / 2**20 / dt_a:.2f} MB/s "
              f"{n_a / dt_a:,.0f} tokens/s | data.prepare {size / 2**20 / dt_b:.2f} MB/s "
              f"{n_b / dt_b:,.0f} tokens/s | ratio {dt_a / dt_b:.3f}", flush=True)
    print(f"median ratio prep/encode_batch throughput: {statistics.median(ratios):.3f} "
          "(goal >= 0.9)")


def main(argv=None):
    a = config.parse_args(Args(), argv, doc=__doc__)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(a.tokenizer or work / "tok")
    if a.tokenizer is None and not (tok_dir / "tokenizer.json").exists():
        books = sorted((ROOT.parent / "shared" / "data" / "gutenberg").glob("[0-9]*.txt"))
        bpe.train([str(f) for f in books], 8192, tok_dir)
    tok = bpe.Tokenizer.load(tok_dir)
    docs, size = make_docs(a.mb)
    with open(work / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    workers = a.workers or os.cpu_count()
    print(f"{len(docs):,} documents, {size / 2**20:.1f} MB of text, vocab {tok.vocab_size}, "
          f"{workers} workers")
    if a.ab:
        run_ab(a, work, tok_dir, size, workers)
    else:
        run_baseline(a, work, tok, docs, size, workers)


if __name__ == "__main__":
    main()
