"""Prep throughput: `data.prepare` (read, clean, dedup, split, tokenize in worker processes, write shards) against
plain `tokenizers` encode_batch on the same documents, alternating A B A B; prints the median ratio (goal >= 0.9).

    python bench/bench_data.py                      # ../shared/data/gutenberg repeated to 100 MB, 3 rounds
    python bench/bench_data.py --mb 10 --rounds 2   # quick look
    python bench/bench_data.py --tokenizer data/tok # your own tokenizer (default: an 8192-token BPE trained here)

The documents: the Gutenberg books (headers stripped) cut into ~4 KB pieces, as web documents are, each made
unique by a number in front (so dedup keeps them), written once to a jsonl file that the prep reads.
Baseline: tokenizers.Tokenizer.encode_batch_fast over the same documents in batches of ~4 MB, all cores (its
own Rust threads), ids pulled out of each Encoding. Candidate: data.prepare with --workers = all cores.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bpe  # noqa: E402  (after the sys.path line: bench/ is not the repo root)
import data  # noqa: E402


def make_docs(target_mb):
    books = sorted((ROOT.parent / "shared" / "data" / "gutenberg").glob("[0-9]*.txt"))
    if not books:
        sys.exit("needs ../shared/data/gutenberg beside the checkout")
    pieces = []
    for b in books:
        text = data.clean(b.read_bytes().decode("utf-8"))[0]
        paras, cur = text.split("\n\n"), []
        for p in paras:
            cur.append(p)
            if sum(map(len, cur)) > 4000:
                pieces.append("\n\n".join(cur))
                cur = []
        pieces.append("\n\n".join(cur))
    docs, size = [], 0
    while size < target_mb * 2**20:
        for p in pieces:
            doc = data.clean(f"{len(docs)} {p}")[0]  # what the prep would keep
            if len(doc) >= data.MIN_CHARS and size < target_mb * 2**20:
                docs.append(doc)
                size += len(doc.encode())
    return docs, size


def baseline(tok, docs):
    n, j = 0, 0
    while j < len(docs):
        k, chars = j, 0
        while k < len(docs) and chars < 1 << 22:
            chars, k = chars + len(docs[k]), k + 1
        n += sum(len(e.ids) for e in tok.tok.encode_batch_fast(docs[j:k], add_special_tokens=False))
        j = k
    return n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "data"))
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.tokenizer is None and not (work / "tok" / "tokenizer.json").exists():
        bpe.train([str(f) for f in sorted((ROOT.parent / "shared" / "data" / "gutenberg").glob("[0-9]*.txt"))],
                  8192, work / "tok")
    tok = bpe.Tokenizer.load(a.tokenizer or work / "tok")
    docs, size = make_docs(a.mb)
    with open(work / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    workers = os.cpu_count()
    print(f"{len(docs):,} documents, {size / 2**20:.1f} MB of text, vocab {tok.vocab_size}, {workers} cores")
    ratios = []
    for r in range(a.rounds):
        t = time.perf_counter()
        n_a = baseline(tok, docs)
        dt_a = time.perf_counter() - t
        shutil.rmtree(work / "prep", ignore_errors=True)
        t = time.perf_counter()
        meta = data.prepare([str(work / "docs.jsonl")], tok, work / "prep", val_fraction=0.0005, workers=workers)
        dt_b = time.perf_counter() - t
        n_b = meta["train_tokens"] + meta["val_tokens"] - meta["docs"]["docs_kept"]  # minus one bos per document
        assert n_b == n_a, (n_a, n_b)
        ratios.append(dt_a / dt_b)
        print(f"round {r}: encode_batch {size / 2**20 / dt_a:.2f} MB/s {n_a / dt_a:,.0f} tokens/s | "
              f"data.prepare {size / 2**20 / dt_b:.2f} MB/s {n_b / dt_b:,.0f} tokens/s | ratio {dt_a / dt_b:.3f}")
    print(f"median ratio prep/encode_batch throughput: {statistics.median(ratios):.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
