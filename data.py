"""Data for kiln: download, clean and tokenize text into checked uint16 shards; SFT chat data; MMLU.

    python data.py --input data/raw/ --tokenizer data/tok --out data/mydata    # txt, jsonl[.gz|.zst], json[.gz], parquet, arrow
    python data.py --input stories.txt --txt_separator '<|endoftext|>' --tokenizer data/tok --out data/stories
    python data.py --source fineweb-edu --max_shards 2 --tokenizer data/tok --out data/fineweb    # a hub preset
    python data.py --sft --input chat.jsonl extra.parquet:0.5 --tokenizer data/tok --out data/chat   # path:WEIGHT
    python data.py --sft --source smoltalk --max_shards 1 --tokenizer data/tok --out data/smoltalk
    python data.py --mmlu --out data/mmlu           # fetch cais/mmlu in the original CSV layout, or check the folder
    python data.py --input ../shared/data/gutenberg --tokenizer /tmp/tok --out /tmp/gut --workers 2  # CPU smoke run
Presets: fineweb-edu, c4, wikipedia, gutenberg, tinystories, wikitext; SFT: smoltalk, alpaca, dolly. Books3 is no
longer distributable: bring your own files with --input. SFT records: messages, conversations, alpaca, dolly,
question/answer, self-instruct.

Shard (.bin): 256 int32 header (magic, version, vocab_size, token count as int64, tokenizer hash prefix), then
uint16 tokens; every document starts with <|bos|>. A prep that is killed resumes where it stopped when run again
and ends byte-identical to an uninterrupted one: a work unit of --shard_mb MB of text becomes one shard,
written to a temporary name and renamed, and .prep_state.json records the finished ones.
"""
import argparse
import csv
import fnmatch
import functools
import hashlib
import io
import itertools
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

import bpe
import common
import readers

MAGIC, VERSION, HEADER_INTS = 0x6B696C6E, 1, 256  # magic = b"kiln" as a little-endian int32
HEADER_BYTES = HEADER_INTS * 4
MIN_CHARS = 10  # documents shorter than this after cleaning are "near-empty" and dropped
ROOT = Path(__file__).resolve().parent


# ---------- Shards
def write_shard(path, tokens, vocab_size, tok_hash):
    if vocab_size > 65536:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint16 shards: use a tokenizer of at most 65536")
    tokens = np.asarray(tokens, dtype=np.uint16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, vocab_size
    header[3:5] = np.array([len(tokens)], dtype="<i8").view("<i4")
    header[5:7] = np.frombuffer(bytes.fromhex(tok_hash[:16].ljust(16, "0")), dtype="<i4")
    common.write_atomic(path, header.tobytes(), tokens.astype("<u2", copy=False).tobytes())


def shard_header(path):
    """(vocab_size, n_tokens, tokenizer hash prefix) of a shard, after checking magic, version and file size."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path} is truncated ({size} bytes, shorter than the header): re-run data.py")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path} is not a kiln shard (wrong magic number): prepare it with data.py")
    if header[1] != VERSION:
        raise ValueError(f"{path} has shard format version {header[1]}, this data.py reads {VERSION}: re-run data.py")
    n = int(header[3:5].copy().view("<i8")[0])
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path} is truncated: its header says {n} tokens but it holds {(size - HEADER_BYTES) // 2}"
                         "; delete it and re-run data.py")
    return int(header[2]), n, header[5:7].tobytes().hex()


def read_shard(path, vocab_size=None):
    """The tokens of a checked shard as a read-only np.memmap (uint16)."""
    vocab, n, _ = shard_header(path)
    if vocab_size is not None and vocab != vocab_size:
        raise ValueError(f"{path} was tokenized with vocab_size {vocab} but the model has {vocab_size}: "
                         "use the tokenizer the data was prepared with")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


@functools.lru_cache(maxsize=64)  # memmaps of the recently used shards: thousands would pass the open-file limit
def _open_shard(path, n_tokens):
    """A shard whose header _Windows checked when it opened the directory: no header read on this hot path
    (with many shards, random order misses this cache on most windows)."""
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


# ---------- Pretraining reader: a seeded order without an n-sized permutation array; a global window counter
def _mix(x, key):
    """splitmix64's finaliser: a well-mixed uint64 hash of each element of x (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) ^ np.uint64(key & (2**64 - 1))
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(*ints):
    """A uint64 seed from small ints (the same in every process, unlike hash())."""
    k = 0x6B696C6E
    for v in ints:
        k = int(_mix(np.array([v % 2**64], dtype=np.uint64), k)[0])
    return k


def _permute(i, n, key):
    """A seeded bijection of [0, n): a 4-round Feistel network on the next even power of two, with cycle walking
    (values that land >= n are permuted again until they fall inside). O(1) memory for any corpus size."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    x = np.asarray(i, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        left, right = x[todo] >> np.uint64(half), x[todo] & mask
        for r in range(4):
            left, right = right, left ^ (_mix(right, key + r) & mask)
        x[todo] = (left << np.uint64(half)) | right
        todo = x >= n
    return x.astype(np.int64)


def _shuffle(k, n, seed):
    """Stream indices k -> indices in [0, n), in a fresh seeded order each epoch (epoch = k // n)."""
    epoch, i = np.divmod(np.asarray(k, dtype=np.int64), n)
    for e in np.unique(epoch):
        i[epoch == e] = _permute(i[epoch == e], n, _key(seed, int(e)))
    return i


class _Windows:
    """The windows of block_size + 1 tokens in the shards of one prepared dir. Random mode visits a fresh
    permutation of all windows each epoch; sequential mode goes in file order."""

    def __init__(self, data_dir, split, block_size, vocab_size, seed, sequential):
        self.files = [str(f) for f in sorted(Path(data_dir).glob(f"{split}_*.bin"))]
        if not self.files:
            raise FileNotFoundError(f"no {split}_*.bin shards in {data_dir}: prepare them with "
                                    f"`python data.py --input ... --out {data_dir}`")
        self.sizes = [len(read_shard(f, vocab_size)) for f in self.files]  # check every header now, not hours in
        tokenizers = {shard_header(f)[::2] for f in self.files}  # (vocab_size, tokenizer hash prefix)
        if len(tokenizers) > 1:
            raise ValueError(f"the shards in {data_dir} were made by different tokenizers {sorted(tokenizers)}: "
                             "re-run data.py into an empty --out")
        self.tokenizer = tokenizers.pop()
        self.T, self.seed, self.sequential = block_size, seed, sequential
        # stride T: x of window i ends where x of window i+1 starts; y needs one extra token
        self.cum = np.concatenate([[0], np.cumsum([max(0, (n - 1) // block_size) for n in self.sizes])])
        self.n = int(self.cum[-1])
        if self.n == 0:
            raise ValueError(f"{data_dir} {split} has fewer than block_size + 1 = {block_size + 1} tokens per shard: "
                             "use a smaller block_size or more data")

    def windows(self, k):
        """k: array of stream indices -> list of (T+1,) token rows."""
        i = np.asarray(k, dtype=np.int64) % self.n if self.sequential else _shuffle(k, self.n, self.seed)
        shard = np.searchsorted(self.cum, i, side="right") - 1
        start = (i - self.cum[shard]) * self.T
        return [_open_shard(self.files[s], self.sizes[s])[p:p + self.T + 1] for s, p in zip(shard, start)]


class PretrainLoader:
    """Batches of windows from prepared shards, or a mixture "dirA:0.7,dirB:0.3".

    Order is fixed by a global window counter: on rank r, a call returns windows [pos + r*B, pos + r*B + B) and
    pos advances by world_size * B, so 1 rank x grad-accum 2 sees what 2 ranks x grad-accum 1 see.
    A mixture picks the source of each global window from a seeded hash of its index, and each source keeps
    its own window counter (saved in state_dict), so resume continues exactly."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=0,
                 sequential=False, vocab_size=None):
        parts = readers.parse_weighted(data_dir)
        self.sources = [name for name, _ in parts]
        w = np.array([w for _, w in parts])
        self.cum_weights = np.cumsum(w / w.sum())
        self.parts = [_Windows(name, split, block_size, vocab_size, _key(seed, j), sequential)
                      for j, name in enumerate(self.sources)]
        if len({p.tokenizer for p in self.parts}) > 1:  # equal vocab sizes are not enough: the ids must mean the same
            raise ValueError(f"the mixture {data_dir} mixes data from different tokenizers: prepare every source "
                             "with the same --tokenizer")
        self.B, self.T, self.rank, self.world, self.seed = batch_size, block_size, rank, world_size, seed
        self.sequential, self.pos, self.counts = sequential, 0, [0] * len(self.parts)

    def next_batch(self):
        """(x, y): (B, T) int64 tensors on CPU; y is x shifted by one token."""
        import torch  # here, not at the top: prep and its worker processes never need torch
        g = self.pos + np.arange(self.world * self.B)  # every rank's windows of this step, to keep the counters
        u = _mix(g, _key(self.seed, -1)).astype(np.float64) / 2.0**64
        src = np.minimum(np.searchsorted(self.cum_weights, u, side="right"), len(self.parts) - 1)
        rows = [None] * self.B
        mine = slice(self.rank * self.B, self.rank * self.B + self.B)
        for j, part in enumerate(self.parts):
            hit = src == j
            local = self.counts[j] + np.cumsum(hit) - 1  # this source's own window index for each hit
            sel = np.flatnonzero(hit[mine])
            for r, win in zip(sel, part.windows(local[mine][sel])):
                rows[r] = win
            self.counts[j] += int(hit.sum())
        self.pos += len(g)
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self):
        return {"pos": self.pos, "counts": list(self.counts), "sources": self.sources, "block_size": self.T,
                "seed": self.seed, "sequential": self.sequential}

    def load_state_dict(self, d):
        if d["sources"] != self.sources or d["block_size"] != self.T:
            raise ValueError(f"data state was saved for {d['sources']} with block_size {d['block_size']}, not "
                             f"{self.sources} with {self.T}: resume with the same data_dir and block_size")
        if (d["seed"], d["sequential"]) != (self.seed, self.sequential):  # else the order silently changes
            raise ValueError(f"data state was saved with seed {d['seed']} (sequential={d['sequential']}), not "
                             f"{self.seed} ({self.sequential}): resume with the seed the run started with")
        self.pos, self.counts = int(d["pos"]), [int(c) for c in d["counts"]]


# ---------- Downloads: thin wrappers over huggingface_hub. (preset: repo, file patterns, text field)
PRESETS = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", ["sample/10BT/*.parquet"], "text"),
    "c4": ("allenai/c4", ["en/c4-train.*.json.gz"], "text"),
    "wikipedia": ("wikimedia/wikipedia", ["20231101.en/*.parquet"], "text"),
    "gutenberg": ("manu/project_gutenberg", ["data/en-*.parquet"], "text"),
    "tinystories": ("roneneldan/TinyStories", ["data/train-*.parquet"], "text"),
    "wikitext": ("Salesforce/wikitext", ["wikitext-103-raw-v1/train-*.parquet"], "text"),  # rows are lines
    "smoltalk": ("HuggingFaceTB/smoltalk", ["data/all/train-*.parquet"], "messages"),
    "alpaca": ("tatsu-lab/alpaca", ["data/train-*.parquet"], None),
    "dolly": ("databricks/databricks-dolly-15k", ["databricks-dolly-15k.jsonl"], None),
}
SFT_PRESETS = ("smoltalk", "alpaca", "dolly")


def hub_files(preset, repo, patterns, max_files=None, fix=None):
    """Download (resumably, with progress bars) the dataset files matching patterns; without network fall back
    to the local Hugging Face cache, and if they are not there raise one line saying what to fetch."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")  # read at import: fail fast when the network is slow
    import huggingface_hub as hf
    from huggingface_hub import constants
    host = urlparse(constants.ENDPOINT)
    try:
        if constants.HF_HUB_OFFLINE:
            raise ConnectionError("HF_HUB_OFFLINE is set")
        socket.create_connection((host.hostname, host.port or 443), timeout=5).close()  # the hub retries for ~30 s
        names = sorted(f for f in hf.HfApi().list_repo_files(repo, repo_type="dataset")
                       if any(fnmatch.fnmatch(f, p) for p in patterns))[:max_files]
        return [Path(hf.hf_hub_download(repo, f, repo_type="dataset")) for f in names]
    except Exception as e:  # offline, no route, timeout, hub error: try the cache before giving up
        err = f"{type(e).__name__}: {e}".split("\n")[0][:120]
    try:
        root = Path(hf.snapshot_download(repo, repo_type="dataset", allow_patterns=patterns, local_files_only=True))
        files = sorted(f for f in root.rglob("*") if f.is_file() and
                       any(fnmatch.fnmatch(f.relative_to(root).as_posix(), p) for p in patterns))[:max_files]
    except Exception:
        files = []
    if not files:
        fix = fix or (f"on a machine with network run `hf download {repo} --repo-type dataset --include "
                      f"'{patterns[0]}' --local-dir DIR`, copy DIR here and pass --input DIR")
        raise ValueError(f"preset {preset}: {repo} files {' '.join(patterns)} are not in the Hugging Face cache and "
                         f"the hub cannot be reached ({err}); {fix}")
    return files


# ---------- Pretraining prep: read -> clean -> dedup -> split -> tokenize (worker processes) -> shards
_PG_START = re.compile(r"^\*\*\* ?START OF.*$", re.M)
_PG_END = re.compile(r"^\*\*\* ?END OF", re.M)
_PG_LAST = re.compile(r"^End of (the )?Project Gutenberg", re.M)  # the book's own closing line, just before
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def clean(text):
    """(text, stripped_gutenberg): BOM removed, newlines normalised to \\n, the Project Gutenberg header and
    licence footer cut, outer whitespace stripped."""
    text = text.lstrip("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _PG_START.search(text) if "START OF" in text else None
    if start:
        end = _PG_END.search(text, start.end())
        text = text[start.end():end.start() if end else None]
        last = _PG_LAST.search(text, max(0, len(text) - 1000))
        text = text[:last.start()] if last else text
    return text.strip(), start is not None


def iter_docs(files, text_field, txt_separator, stats, wikitext=False):
    """Raw documents in file order. Invalid UTF-8 in txt is replaced (U+FFFD) and counted, never a crash;
    --txt_separator splits a txt file into documents; wikitext rows (one line each) are joined into articles."""
    for path in files:
        if path.name.endswith(".txt"):
            raw = path.read_bytes()
            try:
                text, bad = raw.decode("utf-8"), False
            except UnicodeDecodeError:
                text, bad = raw.decode("utf-8", errors="replace"), True
            for part in text.split(txt_separator) if txt_separator else [text]:
                stats["utf8_replaced"] += bad and "\ufffd" in part
                yield part
        elif wikitext:
            article = []
            for line in readers.iter_texts([path], text_field):
                if _WIKITEXT_TITLE.match(line) and article:
                    yield "".join(article)
                    article = []
                article.append(line)
            yield "".join(article)
        else:
            yield from readers.iter_texts([path], text_field)


def _units(docs, stats, shard_bytes, val_fraction, max_docs):
    """Clean, drop near-empty and duplicate documents, split train/val by a hash of the text (stable under any
    reordering or resume), and cut the stream into work units of about shard_bytes of UTF-8 text."""
    seen, train, val, size, i = set(), [], [], 0, 0
    cut = int(val_fraction * 2**64)
    for doc in docs:
        if max_docs is not None and stats["docs_kept"] >= max_docs:
            break
        stats["docs_read"] += 1
        text, pg = clean(doc)
        stats["gutenberg_stripped"] += pg
        if len(text) < MIN_CHARS:
            stats["dropped_empty"] += 1
            continue
        b = text.encode("utf-8")
        h = hashlib.blake2b(b, digest_size=16).digest()
        key = int.from_bytes(h[:8], "little")
        if key in seen:
            stats["dropped_duplicate"] += 1
            continue
        seen.add(key)
        stats["docs_kept"] += 1
        stats["text_bytes"] += len(b)
        (val if int.from_bytes(h[8:], "little") < cut else train).append(text)
        size += len(b)
        if size >= shard_bytes:
            yield i, train, val, size
            i, train, val, size = i + 1, [], [], 0
    if train or val:
        yield i, train, val, size


_TOK = None  # the tokenizer of this worker process


def _init_worker(tok_dir, in_process):
    global _TOK
    if not in_process:  # several worker processes already use the cores; tokenizers' threads would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _TOK = bpe.Tokenizer.load(tok_dir)


def _exit_with_parent(parent):  # a prep killed with SIGKILL must not leave idle workers behind
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _tokenize_unit(out_dir, i, train, val, batch_chars=1 << 22):
    """One work unit -> train_{i:06d}.bin and (if it has val documents) val_{i:06d}.bin. Runs in a worker.
    Documents are encoded in batches of about batch_chars so that the Python lists of ids stay a few MB."""
    counts = {}
    for split, texts in (("train", train), ("val", val)):
        parts, j = [np.zeros(0, dtype=np.uint16)], 0
        while j < len(texts):
            k, n = j + 1, len(texts[j])
            while k < len(texts) and n < batch_chars:
                n, k = n + len(texts[k]), k + 1
            flat = []
            for ids in _TOK.encode_batch(texts[j:k]):
                flat.append(_TOK.bos_id)
                flat += ids
            parts.append(np.array(flat, dtype=np.uint16))
            j = k
        tokens = np.concatenate(parts)
        counts[split] = len(tokens)
        if texts:
            write_shard(Path(out_dir) / f"{split}_{i:06d}.bin", tokens, _TOK.vocab_size, _TOK.hash)
    return i, counts


def _load_tokenizer(tokenizer):
    if tokenizer is None:
        raise ValueError("no tokenizer given: pass --tokenizer DIR (train one with `python bpe.py --input ...`)")
    tok = tokenizer if isinstance(tokenizer, bpe.Tokenizer) else bpe.Tokenizer.load(tokenizer)
    if tok.vocab_size > 65536:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, more than uint16 shards hold (65536): "
                         "train one with --vocab_size 65536 or less")
    if tok.bos_id is None:
        raise ValueError("the tokenizer has no <|bos|> token: train one with bpe.py")
    return tok


def prepare(inputs, tokenizer, out_dir, text_field="text", val_fraction=0.0005, workers=None, txt_separator=None,
            max_docs=None, shard_mb=None, wikitext=False):
    """Tokenize local files into out_dir (train_*.bin, val_*.bin, meta.json, tokenizer copy); returns meta.
    Resumes a killed run of the same prep and then ends byte-identical to an uninterrupted one."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction {val_fraction} must be in [0, 1)")
    tok = _load_tokenizer(tokenizer)
    files = readers.find_files([str(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs)])
    workers = workers or os.cpu_count()
    stats = dict.fromkeys(["docs_read", "docs_kept", "gutenberg_stripped", "dropped_empty", "dropped_duplicate",
                           "utf8_replaced", "text_bytes"], 0)
    # Each shard is one work unit of a worker: about 1/64 of the input, so that small inputs still keep every
    # core busy, between 1 and 100 MB of text. It depends only on the inputs: every machine writes the same shards.
    shard_mb = shard_mb or min(100.0, max(1.0, sum(f.stat().st_size for f in files) / 2**20 / 64))
    docs = iter_docs(files, text_field, txt_separator, stats, wikitext)
    units = _units(docs, stats, int(shard_mb * 2**20), val_fraction, max_docs)
    first = next(units, None)  # a bad file or field fails here, before anything is written
    if first is None:
        raise ValueError(f"no documents left in {[str(f) for f in files]} after cleaning ({stats['docs_read']} read, "
                         f"{stats['dropped_empty']} empty, {stats['dropped_duplicate']} duplicates)")
    sources = [{"name": f.name, "path": str(f), "bytes": f.stat().st_size, "sha256": common.sha256_file(f)} for f in files]
    settings = {"sources": [[s["name"], s["sha256"]] for s in sources], "tokenizer_hash": tok.hash,
                "text_field": text_field, "val_fraction": val_fraction, "txt_separator": txt_separator,
                "max_docs": max_docs, "shard_mb": shard_mb, "wikitext": wikitext, "version": VERSION}

    # resume: the state file names the finished units of an earlier run of this same prep
    out, pause = Path(out_dir), float(os.environ.get("KILN_PREP_SLEEP", 0))  # tests kill a slowed prep midway
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp*"):  # temporary files of a killed run
        stale.unlink()
    state_file = out / ".prep_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if state and state["settings"] != settings:
        raise ValueError(f"{out} holds a prep of other inputs or settings: use a new --out or delete it")
    if not state and any(out.glob("*.bin")):
        raise ValueError(f"{out} already holds shards from another prep: use a new --out or delete it")
    state = state or {"settings": settings, "done": {}}
    tok.save(out)  # tokenizer.json is saved byte for byte, so the hash is unchanged
    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=f"tokenizing into {out}", smoothing=0.1)
    t0, tokens_done = time.time(), 0

    def finish(i, counts, size):
        nonlocal tokens_done
        state["done"][str(i)] = counts
        common.write_atomic(state_file, json.dumps(state, sort_keys=True).encode())
        tokens_done += counts["train"] + counts["val"]
        bar.update(size)
        bar.set_postfix(tokens_per_s=f"{tokens_done / (time.time() - t0):,.0f}")
        time.sleep(pause)

    # workers=1 tokenizes in a thread of this process: no process start-up, and tokenizers' own threads
    pool = (ProcessPoolExecutor(workers, get_context("spawn"), initializer=_init_worker, initargs=(out, False))
            if workers > 1 else ThreadPoolExecutor(1, initializer=_init_worker, initargs=(out, True)))
    with pool:
        pending = {}
        for i, train, val, size in itertools.chain([first], units):
            done = state["done"].get(str(i))
            if done and all((out / f"{s}_{i:06d}.bin").exists() for s in ("train", "val") if done[s]):
                continue  # finished by an earlier run
            pending[pool.submit(_tokenize_unit, out, i, train, val)] = size
            while len(pending) >= 2 * workers:  # bounded: never read far ahead of the workers
                for f in wait(pending, return_when=FIRST_COMPLETED).done:
                    finish(*f.result(), pending.pop(f))
        for f in list(pending):
            finish(*f.result(), pending.pop(f))
    bar.close()
    n = {s: sum(c[s] for c in state["done"].values()) for s in ("train", "val")}
    meta = {"kind": "pretrain", "format_version": VERSION, "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "sources": sources, "settings": settings, "docs": stats,
            "train_tokens": n["train"], "val_tokens": n["val"],
            "train_shards": len(list(out.glob("train_*.bin"))), "val_shards": len(list(out.glob("val_*.bin")))}
    common.write_atomic(out / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    print(f"{out}: {n['train']:,} train + {n['val']:,} val tokens from {stats['docs_kept']:,} documents "
          f"({stats['text_bytes'] / 2**20:,.1f} MB); dropped {stats['dropped_empty']} near-empty and "
          f"{stats['dropped_duplicate']} duplicates; {stats['gutenberg_stripped']} Gutenberg headers stripped; "
          f"{stats['utf8_replaced']} documents had invalid UTF-8 (replaced with U+FFFD)")
    if val_fraction > 0 and n["val"] == 0:
        print(f"note: no document fell into the val split; raise --val_fraction (now {val_fraction})")
    return meta


# ---------- MMLU
MMLU_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}  # ours -> cais/mmlu's


def load_mmlu(source, split="test", subjects=None):
    """{subject: [{question, choices (4 str), answer 'A'..'D'}]} from "hub" (cais/mmlu) or a folder laid out as
    the original release: {dev,val,test}/<subject>_<split>.csv, no header, 6 fields per row."""
    if split not in MMLU_SPLITS:
        raise ValueError(f"MMLU split {split!r} does not exist: use one of {', '.join(MMLU_SPLITS)}")
    data = {}
    if str(source) == "hub":
        import pyarrow.parquet as pq
        fix = ("put MMLU in its original CSV layout (dev/, val/, test/ with <subject>_<split>.csv) in data/mmlu, "
               "or run `python data.py --mmlu --out data/mmlu` where there is network")
        for f in hub_files("mmlu", "cais/mmlu", [f"all/{MMLU_SPLITS[split]}-*.parquet"], fix=fix):
            for r in pq.read_table(f, columns=["question", "subject", "choices", "answer"]).to_pylist():
                data.setdefault(r["subject"], []).append(
                    {"question": r["question"], "choices": list(r["choices"]), "answer": "ABCD"[r["answer"]]})
        data = dict(sorted(data.items()))
    else:
        files = sorted((Path(source) / split).glob(f"*_{split}.csv"))
        if not files:
            raise FileNotFoundError(f"no {split}/<subject>_{split}.csv files in MMLU folder {source}: "
                                    f"fetch them with `python data.py --mmlu --out {source}`")
        for f in files:
            items = data[f.name[:-len(f"_{split}.csv")]] = []
            with open(f, encoding="utf-8", newline="") as fh:
                reader = csv.reader(fh)
                for row in reader:
                    if len(row) != 6:
                        raise ValueError(f"{f} line {reader.line_num}: expected 6 fields (question, A, B, C, D, "
                                         f"answer), got {len(row)}; fix or remove that row")
                    if row[5].strip() not in ("A", "B", "C", "D"):
                        raise ValueError(f"{f} line {reader.line_num}: answer {row[5]!r} is not A, B, C or D; "
                                         "fix that row")
                    items.append({"question": row[0], "choices": row[1:5], "answer": row[5].strip()})
    if subjects:
        subjects = subjects.split(",") if isinstance(subjects, str) else list(subjects)
        missing = [s for s in subjects if s not in data]
        if missing:
            raise ValueError(f"MMLU subject(s) {', '.join(missing)} not in {source} {split}; "
                             f"available: {', '.join(data)}")
        data = {s: data[s] for s in subjects}
    return data


def save_mmlu(out_dir):
    """Fetch cais/mmlu into the original CSV layout (what load_mmlu(folder) and eval_mmlu.py read)."""
    for split in MMLU_SPLITS:
        (Path(out_dir) / split).mkdir(parents=True, exist_ok=True)
        for subject, items in load_mmlu("hub", split).items():
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows([it["question"], *it["choices"], it["answer"]]
                                                           for it in items)
            common.write_atomic(Path(out_dir) / split / f"{subject}_{split}.csv", buf.getvalue().encode())


def default_mmlu_dir():
    for folder in (ROOT / "data" / "mmlu", ROOT.parent / "shared" / "data" / "mmlu"):
        if (folder / "test").is_dir():
            return folder
    return None


# ---------- SFT: records -> messages -> (ids, mask); decontamination; packing loader
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def to_messages(r):
    """(messages, None) or (None, reason) for one record of a known SFT format."""
    if not isinstance(r, dict):
        return None, "bad_json" if r is None else "not_an_object"
    if "messages" in r or "conversations" in r:
        raw = r.get("messages", r.get("conversations"))
        if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
            return None, "bad_messages"
        msgs = [{"role": ROLE_NAMES.get(m.get("role", m.get("from"))), "content": m.get("content", m.get("value"))}
                for m in raw]
    elif "instruction" in r:  # alpaca (input/output), dolly (context/response), self-instruct (instances)
        first = (r.get("instances") or [{}])[0] if isinstance(r.get("instances"), list) else {}
        first = first if isinstance(first, dict) else {}
        extra = r.get("input", r.get("context", first.get("input"))) or ""
        answer = r.get("output", r.get("response", first.get("output")))
        if not all(isinstance(x, str) for x in (r["instruction"], extra, answer)):
            return None, "bad_messages"
        msgs = [{"role": "user", "content": r["instruction"] + ("\n\n" + extra if extra.strip() else "")},
                {"role": "assistant", "content": answer}]
    elif "question" in r and "answer" in r:  # gsm8k
        msgs = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
    else:
        return None, "unknown_format"
    if any(m["role"] is None or not isinstance(m["content"], str) for m in msgs):
        return None, "bad_messages"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        return None, "no_assistant"
    if any(not m["content"].strip() for m in msgs if m["role"] == "user"):
        return None, "empty_user"
    return msgs, None


def _ngrams(text, n=13):
    """Lowercased word n-grams: GPT-3's contamination check."""
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def load_sft(inputs, tokenizer, max_len, grams=None):
    """(convs, counts): convs = [(ids, mask)] rendered by tokenizer.render_chat from jsonl(.gz/.zst), json or
    parquet records; inputs may carry weights ("chat.jsonl:2" repeats, ":0.5" keeps the first half).
    Records that are malformed, longer than max_len tokens or (with grams) overlapping MMLU are counted, not kept."""
    convs, counts = [], {"records": 0, "kept": 0}
    for name, weight in readers.parse_weighted(inputs):
        mine = []
        for path in readers.find_files([name]):
            for r in readers.iter_records(path):
                counts["records"] += 1
                msgs, why = to_messages(r)
                if msgs is not None and grams and _ngrams("\n".join(m["content"] for m in msgs)) & grams:
                    why = "contaminated"
                if msgs is not None and why is None:
                    try:
                        ids, mask = tokenizer.render_chat(msgs)
                        why = "too_long" if len(ids) > max_len else None
                    except ValueError:  # roles out of order
                        why = "bad_messages"
                if why:
                    counts[why] = counts.get(why, 0) + 1
                else:
                    mine.append((ids, mask))
        counts["kept"] += len(mine)
        convs += mine * int(weight) + mine[:round((weight % 1) * len(mine))]
    if not convs:
        raise ValueError(f"no usable SFT records in {inputs}: {counts}; records need messages (role/content), "
                         "conversations (from/value), instruction/output or question/answer")
    return convs, counts


def prepare_sft(inputs, tokenizer, out_dir, max_len=2048, val_fraction=0.02, mmlu_dir=None, decontaminate=True):
    """Write an SFT dir: {train,val}_{ids (uint16), mask (uint8), offsets (int64)}.npy, meta.json, tokenizer."""
    tok = _load_tokenizer(tokenizer)
    grams, mmlu_dir = None, mmlu_dir or default_mmlu_dir()
    if decontaminate and mmlu_dir is None:
        print("note: no MMLU folder (data/mmlu or ../shared/data/mmlu) so no decontamination; "
              "fetch one with `python data.py --mmlu --out data/mmlu`")
    elif decontaminate:
        grams = set().union(*(_ngrams(it["question"]) for items in load_mmlu(mmlu_dir, "test").values()
                              for it in items))
    convs, counts = load_sft(inputs, tok, max_len, grams)
    # val split by a hash of the ids: stable, and repeated copies of a record land on the same side
    keys = [int.from_bytes(hashlib.blake2b(np.asarray(ids, np.uint16).tobytes(), digest_size=8).digest(), "little")
            for ids, _ in convs]
    is_val = np.array(keys, dtype=np.uint64) < np.uint64(int(val_fraction * 2**64))
    if val_fraction > 0 and not is_val.any() and len(set(keys)) > 1:
        is_val = np.array(keys) == min(keys)  # a tiny set still gets a val split
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    for split, sel in (("train", ~is_val), ("val", is_val)):
        part = [c for c, s in zip(convs, sel) if s]
        arrays = {"ids": np.concatenate([np.asarray(ids, np.uint16) for ids, _ in part] or [np.zeros(0, np.uint16)]),
                  "mask": np.concatenate([np.asarray(m, np.uint8) for _, m in part] or [np.zeros(0, np.uint8)]),
                  "offsets": np.concatenate([[0], np.cumsum([len(ids) for ids, _ in part])]).astype(np.int64)}
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a)
            common.write_atomic(out / f"{split}_{name}.npy", buf.getbuffer())
    meta = {"kind": "sft", "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size, "max_len": max_len,
            "inputs": [str(i) for i in inputs], "val_fraction": val_fraction, "counts": counts,
            "decontamination": {"mmlu_dir": str(mmlu_dir) if grams else None, "ngram": 13,
                                "removed": counts.get("contaminated", 0)},
            "train_conversations": int((~is_val).sum()), "val_conversations": int(is_val.sum())}
    common.write_atomic(out / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    print(f"{out}: {meta['train_conversations']} train + {meta['val_conversations']} val conversations; {counts}")
    return meta


class SFTLoader:
    """Packs whole conversations into rows of block_size + 1 tokens (greedy, in a seeded order fixed once), and
    serves rows in a fresh seeded order each epoch by the same global-counter rule as PretrainLoader.
    next_batch() -> (x, y, doc_ids): y = -1 where nothing is learned (non-assistant tokens, padding, the jump
    into the next conversation); doc_ids number the conversations of a row 0, 1, ... (padding gets its own)."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=0):
        d = Path(data_dir)
        if not (d / f"{split}_offsets.npy").exists():
            raise FileNotFoundError(f"no SFT {split} split in {d}: prepare it with `python data.py --sft --input "
                                    f"... --out {d}`")
        self.ids, self.mask = (np.load(d / f"{split}_{k}.npy", mmap_mode="r") for k in ("ids", "mask"))
        self.offsets = np.load(d / f"{split}_offsets.npy")
        lengths = np.diff(self.offsets)
        fits = np.flatnonzero(lengths <= block_size + 1)
        self.too_long = len(lengths) - len(fits)  # skipped, and counted in the trainer's log
        if not len(fits):
            raise ValueError(f"no conversation in {d} {split} fits block_size + 1 = {block_size + 1} tokens")
        self.rows, row, used = [], [], 0
        for c in np.random.default_rng(seed).permutation(fits):
            if used + lengths[c] > block_size + 1:
                self.rows.append(row)
                row, used = [], 0
            row.append(int(c))
            used += int(lengths[c])
        self.rows.append(row)
        self.B, self.T, self.rank, self.world, self.seed, self.pos = batch_size, block_size, rank, world_size, seed, 0

    def _row(self, r):
        ids = np.zeros(self.T + 1, dtype=np.int64)  # padding: token 0, never learned
        learn = np.zeros(self.T + 1, dtype=bool)
        doc = np.full(self.T + 1, len(self.rows[r]), dtype=np.int64)
        p = 0
        for j, c in enumerate(self.rows[r]):
            a, b = self.offsets[c], self.offsets[c + 1]
            ids[p:p + b - a], learn[p:p + b - a], doc[p:p + b - a] = self.ids[a:b], self.mask[a:b], j
            p += b - a
        y = np.where(learn[1:] & (doc[1:] == doc[:-1]), ids[1:], -1)
        return ids[:-1], y, doc[:-1]

    def next_batch(self):
        import torch
        g = self.pos + self.rank * self.B + np.arange(self.B)
        rows = [self._row(int(r)) for r in _shuffle(g, len(self.rows), self.seed)]
        self.pos += self.world * self.B
        return tuple(torch.from_numpy(np.stack(a)) for a in zip(*rows))  # x, y, doc_ids: each (B, T)

    def state_dict(self):
        return {"pos": self.pos, "block_size": self.T, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, d):
        if d["block_size"] != self.T or d["rows"] != len(self.rows):
            raise ValueError(f"SFT data state was saved with block_size {d['block_size']} and {d['rows']} rows, "
                             f"not {self.T} and {len(self.rows)}: resume with the same data and block_size")
        self.pos = int(d["pos"])


# ---------- Command line
def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare kiln data: pretraining shards, SFT chat data, MMLU.")
    p.add_argument("--input", nargs="+", help="files, folders or globs (SFT: each may end in :WEIGHT)")
    p.add_argument("--source", nargs="+", help=f"hub preset(s): {', '.join(PRESETS)} (default fineweb-edu; "
                   "smoltalk with --sft)")
    p.add_argument("--tokenizer", help="a kiln tokenizer dir (bpe.py --out)")
    p.add_argument("--out", help="output dir (default for one preset: data/PRESET)")
    p.add_argument("--text_field", default=None, help="text column of jsonl/parquet/arrow (default: text)")
    p.add_argument("--val_fraction", type=float, default=None, help="held-out share (default 0.0005, SFT 0.02)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--txt_separator", default=None, help="split .txt files into documents here (\\n escapes work)")
    p.add_argument("--max_docs", type=int, default=None, help="stop after this many documents")
    p.add_argument("--max_shards", type=int, default=None, help="download at most this many files per preset")
    p.add_argument("--shard_mb", type=float, default=None, help="MB of text per shard (default: input/64, 1 to 100)")
    p.add_argument("--sft", action="store_true", help="prepare SFT chat data")
    p.add_argument("--max_len", type=int, default=2048, help="SFT: longest conversation kept, in tokens")
    p.add_argument("--mmlu_dir", default=None, help="SFT: MMLU folder to decontaminate against")
    p.add_argument("--no_decontam", action="store_true", help="SFT: keep records that overlap MMLU test questions")
    p.add_argument("--mmlu", action="store_true", help="fetch cais/mmlu into --out (CSV layout) or check it")
    a = p.parse_args(argv)
    if a.mmlu:
        out = Path(a.out or "data/mmlu")
        if not (out / "test").is_dir():
            save_mmlu(out)
        for split in MMLU_SPLITS:
            if (out / split).is_dir():
                d = load_mmlu(out, split)
                print(f"{out}/{split}: {len(d)} subjects, {sum(map(len, d.values())):,} questions, all rows valid")
        return
    if not a.tokenizer:
        raise ValueError("give --tokenizer DIR: a folder written by `python bpe.py ... --out DIR`")
    _load_tokenizer(a.tokenizer)  # a bad tokenizer fails now, not after an hour of downloading
    if a.input and a.source:
        raise ValueError("give either --input PATH... or --source PRESET, not both (see python data.py --help)")
    if not a.input and not a.source:
        a.source = ["smoltalk" if a.sft else "fineweb-edu"]  # the default presets
    if not a.out:
        if a.input or len(a.source) > 1:
            raise ValueError("give --out DIR: where to write the prepared data")
        a.out = f"data/{a.source[0]}"  # where config/pretrain_1b.py and config/sft.py look
    if not a.sft and any(":" in s for s in a.source or []):
        raise ValueError("weights on --source are for SFT mixtures; for pretraining prepare each source into its "
                         "own --out and mix at train time: --data_dir=data/a:0.7,data/b:0.3")
    inputs, field = list(a.input or []), a.text_field
    for name, weight in readers.parse_weighted(a.source or []):
        if name not in PRESETS or (name in SFT_PRESETS) != a.sft:
            if name.lower() == "books3":
                raise ValueError("Books3 is no longer distributable: bring your own local files with --input PATH")
            kind = SFT_PRESETS if a.sft else [p for p in PRESETS if p not in SFT_PRESETS]
            raise ValueError(f"unknown {'SFT ' if a.sft else ''}preset {name!r}: use one of {', '.join(kind)}")
        repo, patterns, preset_field = PRESETS[name]
        field = field or preset_field
        files = hub_files(name, repo, patterns, a.max_shards)
        inputs += [f"{f}:{weight}" for f in files] if a.sft else [str(f) for f in files]
    if a.sft:
        prepare_sft(inputs, a.tokenizer, a.out, a.max_len, 0.02 if a.val_fraction is None else a.val_fraction,
                    a.mmlu_dir, not a.no_decontam)
        return
    sep = a.txt_separator.encode().decode("unicode_escape") if a.txt_separator else None
    prepare(inputs, a.tokenizer, a.out, field or "text", 0.0005 if a.val_fraction is None else a.val_fraction,
            a.workers, sep, a.max_docs, a.shard_mb, wikitext=a.source == ["wikitext"])


if __name__ == "__main__":
    common.cli(main)
