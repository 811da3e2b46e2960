"""Benchmark bpe.py against plain Hugging Face `tokenizers` on real English.

    python bench/bench_bpe.py               # 100 MB, vocab 32768, 2 A/B pairs (several minutes)
    python bench/bench_bpe.py --mb 10 --pairs 3 --encode_mb 1   # quick look

Corpus: ../shared/data/gutenberg/*.txt + tinyshakespeare.txt repeated to --mb MB, written to
bench/out/.
1. Training time and peak memory: bpe.train (kiln) vs a direct BpeTrainer.train_from_iterator call
   with the same settings over 1 MB blocks of the same file. Each run is its own process (peak
   RSS = ru_maxrss), alternating kiln, direct, kiln, direct... and the median of the per-pair
   ratios is printed.
2. Memory flatness: kiln's peak RSS on --mb/4 MB vs --mb MB.
3. Encode throughput (MB/s): kiln's Tokenizer.encode_batch vs tokenizers' encode_batch,
   alternating.
"""
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import config  # noqa: E402  (after the sys.path line: bench/ is not the repo root)
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out"


@dataclass
class Args:
    mb: int = 100              # MB of training text
    vocab: int = 32768         # vocabulary size
    pairs: int = 2             # kiln/direct training pairs
    encode_mb: float = 5.0     # MB of text for the encode comparison
    encode_pairs: int = 4      # kiln/direct encode pairs
    child: str | None = None   # internal: run one training (kiln or direct) in this process
    child_path: str | None = None  # internal: its corpus
    child_out: str | None = None   # internal: its output folder


def make_corpus(mb):
    """Real English repeated to at least mb MB (cached in bench/out)."""
    path = OUT / f"bpe_english_{mb}mb.txt"
    if not path.exists():
        sources = sorted((SHARED / "gutenberg").glob("[0-9]*.txt"))
        sources.append(SHARED / "tinyshakespeare.txt")
        if not all(s.is_file() for s in sources):
            sys.exit(f"error: real data not found under {SHARED}")
        text = "".join(s.read_text(encoding="utf-8") for s in sources)
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            written = 0
            while written < mb * 1e6:
                f.write(text)
                written += len(text.encode())
        tmp.replace(path)
    return path


def child(kind, path, vocab, out_dir):
    """One training run in this process; prints seconds and peak RSS as JSON."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    import bpe  # imported by both kinds: the same baseline memory
    t0 = time.perf_counter()
    if kind == "kiln":
        bpe.train([path], vocab, out_dir)
    else:  # what a user would write with tokenizers directly: same settings, 1 MB blocks
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(bpe.SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=bpe.SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        with open(path, encoding="utf-8", newline="") as f:
            tok.train_from_iterator(iter(lambda: f.read(1 << 20), ""), trainer)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save(str(Path(out_dir) / "tokenizer.json"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def run(kind, path, vocab, out_dir):
    r = subprocess.run([sys.executable, __file__, "--child", kind, "--child_path", str(path),
                        "--vocab", str(vocab), "--child_out", str(out_dir)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: the {kind} run failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {kind:6s} {path.name}: {res['seconds']:7.1f} s, "
          f"peak RSS {res['peak_rss_mb']:7.0f} MB", flush=True)
    return res


def main():
    args = config.parse_args(Args(), doc=__doc__)
    if args.child:
        return child(args.child, args.child_path, args.vocab, args.child_out)

    big, small = make_corpus(args.mb), make_corpus(max(1, args.mb // 4))
    work = Path(tempfile.mkdtemp(prefix="bench_bpe_", dir=OUT))
    print(f"1. training on {big.stat().st_size / 1e6:.0f} MB, vocab {args.vocab}: kiln vs direct "
          "tokenizers")
    pairs = [(run("kiln", big, args.vocab, work / "kiln"),
              run("direct", big, args.vocab, work / "direct")) for _ in range(args.pairs)]
    time_ratio = statistics.median(a["seconds"] / b["seconds"] for a, b in pairs)
    mem_ratio = statistics.median(a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs)
    print(f"   median time ratio kiln/direct {time_ratio:.3f}, peak-RSS ratio {mem_ratio:.3f}")

    print(f"2. memory flatness: kiln on {small.stat().st_size / 1e6:.0f} MB vs "
          f"{big.stat().st_size / 1e6:.0f} MB")
    small_rss = run("kiln", small, args.vocab, work / "kiln_small")["peak_rss_mb"]
    big_rss = statistics.median(a["peak_rss_mb"] for a, _ in pairs)
    growth = big.stat().st_size / small.stat().st_size
    print(f"   peak RSS {small_rss:.0f} MB -> {big_rss:.0f} MB (x{big_rss / small_rss:.2f} for "
          f"x{growth:.1f} the text)")

    import tokenizers
    import bpe
    kiln = bpe.Tokenizer.load(work / "kiln")
    raw = tokenizers.Tokenizer.from_file(str(work / "kiln" / "tokenizer.json"))
    text = big.read_text(encoding="utf-8")[:int(args.encode_mb * 1e6)]
    docs = text.split("\n\n")  # paragraphs: a realistic batch of many small documents
    nbytes = len(text.encode()) / 1e6
    print(f"3. encode {nbytes:.1f} MB in {len(docs)} paragraphs: kiln encode_batch vs tokenizers "
          "encode_batch")
    speeds = []
    for _ in range(args.encode_pairs):
        pair = []
        def direct():
            return [e.ids for e in raw.encode_batch(docs, add_special_tokens=False)]
        for name, fn in (("kiln", lambda: kiln.encode_batch(docs)), ("direct", direct)):
            t0 = time.perf_counter()
            fn()
            pair.append(nbytes / (time.perf_counter() - t0))
            print(f"  {name:6s} {pair[-1]:6.2f} MB/s", flush=True)
        speeds.append(pair)
    print(f"   median speed ratio kiln/direct {statistics.median(a / b for a, b in speeds):.3f}")
    summary = {"mb": args.mb, "vocab": args.vocab, "train_time_ratio": time_ratio,
               "train_rss_ratio": mem_ratio, "train": pairs, "rss_small_mb": small_rss,
               "rss_big_mb": big_rss, "encode_mb_s": speeds}
    (OUT / "bench_bpe.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
