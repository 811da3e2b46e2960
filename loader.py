"""Training-time loaders: batches of prepared pretraining shards or SFT files, in a seeded order.

    loader = PretrainLoader("data/fineweb-edu", "train", batch_size=16, block_size=1024)
    x, y, doc_ids, state = next(loader)  # x, y: (B, T) int64; doc_ids: None, (B, T) for SFTLoader
    loader.load_state_dict(state)        # later: continue with the batch after that one

Each batch travels with the loader state right after it (as nanochat's loader yields its
state_dict), so a checkpoint saves the position of the last batch trained on, not of batches
fetched ahead. The order comes from a global row counter: on rank r a batch holds rows
[pos + r*B, pos + r*B + B) and pos advances by world_size * B, so 1 rank with grad-accum 2 sees
what 2 ranks with grad-accum 1 see. Shards are memory-mapped, never read whole.
"""
import functools
import os
from pathlib import Path

import numpy as np
import torch

import readers
import shards


# ---------- A seeded order without an n-sized permutation array
def _mix(x, key):
    """splitmix64's finaliser: a well-mixed uint64 hash of each element of x (wrapping
    arithmetic)."""
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
    """A seeded bijection of [0, n): a 4-round Feistel network on the next even power of two, with
    cycle walking (values that land >= n are permuted again until they fall inside). O(1) memory
    for any n."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    x = np.asarray(i, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        left = x[todo] >> np.uint64(half)
        right = x[todo] & mask
        for r in range(4):
            left, right = right, left ^ (_mix(right, key + r) & mask)
        x[todo] = (left << np.uint64(half)) | right
        todo = x >= n
    return x.astype(np.int64)


def _shuffle(k, n, seed):
    """Stream indices k -> indices in [0, n), a fresh seeded order each epoch (epoch = k // n)."""
    epoch, i = np.divmod(np.asarray(k, dtype=np.int64), n)
    for e in np.unique(epoch):
        i[epoch == e] = _permute(i[epoch == e], n, _key(seed, int(e)))
    return i


# ---------- Pretraining
# memmaps of the recently used shards: thousands would pass the open-file limit
@functools.lru_cache(maxsize=64)
def _open_shard(path, n_tokens, inode):
    """A shard whose header _Windows checked when it opened the directory: no header read on this
    hot path (with many shards, random order misses this cache on most windows). The inode is part
    of the key, so a shard re-written at the same path since is opened afresh."""
    return shards.open_tokens(path, n_tokens)


class _Windows:
    """The windows of block_size + 1 tokens in the shards of one prepared dir. Random mode visits
    a fresh permutation of all windows each epoch; sequential mode goes in file order."""

    def __init__(self, data_dir, split, block_size, vocab_size, seed, sequential):
        self.files = [str(f) for f in sorted(Path(data_dir).glob(f"{split}_*.bin"))]
        if not self.files:
            raise FileNotFoundError(f"no {split}_*.bin shards in {data_dir}: prepare them with "
                                    f"`python data.py --input ... --out {data_dir}`")
        headers = [shards.shard_header(f) for f in self.files]   # all checked now, not hours in
        self.sizes = [n for _, n, _ in headers]
        self.inodes = [os.stat(f).st_ino for f in self.files]
        tokenizers = {(vocab, tok_hash) for vocab, _, tok_hash in headers}
        for f, (vocab, _, _) in zip(self.files, headers):
            if vocab_size is not None and vocab != vocab_size:
                raise ValueError(f"{f} was tokenized with vocab_size {vocab} but the model has "
                                 f"{vocab_size}: use the tokenizer the data was prepared with")
        if len(tokenizers) > 1:
            raise ValueError(f"the shards in {data_dir} were made by different tokenizers "
                             f"{sorted(tokenizers)}: re-run data.py into an empty --out")
        self.tokenizer = tokenizers.pop()
        self.T = block_size
        self.seed = seed
        self.sequential = sequential
        # stride T: x of window i ends where x of window i+1 starts; y needs one extra token
        per_shard = [max(0, (n - 1) // block_size) for n in self.sizes]
        self.cum = np.concatenate([[0], np.cumsum(per_shard)])
        self.n = int(self.cum[-1])
        if self.n == 0:
            raise ValueError(f"{data_dir} {split} has fewer than block_size + 1 = "
                             f"{block_size + 1} tokens per shard: use a smaller block_size or more "
                             "data")

    def windows(self, k):
        """k: array of stream indices -> list of (T+1,) token rows."""
        if self.sequential:
            i = np.asarray(k, dtype=np.int64) % self.n
        else:
            i = _shuffle(k, self.n, self.seed)
        shard = np.searchsorted(self.cum, i, side="right") - 1
        start = (i - self.cum[shard]) * self.T
        return [_open_shard(self.files[s], self.sizes[s], self.inodes[s])[p:p + self.T + 1]
                for s, p in zip(shard, start)]


class PretrainLoader:
    """Batches of windows from prepared shards, or from a mixture "dirA:0.7,dirB:0.3".

    A mixture picks the source of each global window from a seeded hash of its index, and each
    source keeps its own window counter (in the state), so a resumed run continues exactly."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=0,
                 sequential=False, vocab_size=None):
        parts = readers.parse_weighted(data_dir)
        self.sources = [name for name, _ in parts]
        w = np.array([w for _, w in parts])
        self.cum_weights = np.cumsum(w / w.sum())
        self.parts = [_Windows(name, split, block_size, vocab_size, _key(seed, j), sequential)
                      for j, name in enumerate(self.sources)]
        # equal vocab sizes are not enough: the ids must mean the same
        if len({p.tokenizer for p in self.parts}) > 1:
            raise ValueError(f"the mixture {data_dir} mixes data from different tokenizers: "
                             "prepare every source with the same --tokenizer")
        self.B = batch_size
        self.T = block_size
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.sequential = sequential
        self.pos = 0
        self.counts = [0] * len(self.parts)

    def __iter__(self):
        return self

    def __next__(self):
        """(x, y, None, state): x, y (B, T) int64 CPU tensors, y is x shifted by one token."""
        # every rank's windows of this step, to keep the per-source counters
        g = self.pos + np.arange(self.world * self.B)
        u = _mix(g, _key(self.seed, -1)).astype(np.float64) / 2.0**64
        src = np.minimum(np.searchsorted(self.cum_weights, u, side="right"), len(self.parts) - 1)
        rows = [None] * self.B
        mine = slice(self.rank * self.B, self.rank * self.B + self.B)
        for j, part in enumerate(self.parts):
            hit = src == j
            local = self.counts[j] + np.cumsum(hit) - 1  # this source's window index of each hit
            sel = np.flatnonzero(hit[mine])
            for r, win in zip(sel, part.windows(local[mine][sel])):
                rows[r] = win
            self.counts[j] += int(hit.sum())
        self.pos += len(g)
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), None, self.state_dict()

    def state_dict(self):
        return {"pos": self.pos, "counts": list(self.counts), "sources": self.sources,
                "block_size": self.T, "seed": self.seed, "sequential": self.sequential}

    def load_state_dict(self, d):
        if d["sources"] != self.sources or d["block_size"] != self.T:
            raise ValueError(f"data state was saved for {d['sources']} with block_size "
                             f"{d['block_size']}, not {self.sources} with {self.T}: resume with "
                             "the same data_dir and block_size")
        # another seed or mode would silently change the order
        if (d["seed"], d["sequential"]) != (self.seed, self.sequential):
            raise ValueError(f"data state was saved with seed {d['seed']} "
                             f"(sequential={d['sequential']}), not {self.seed} "
                             f"({self.sequential}): resume with the seed the run started with")
        self.pos = int(d["pos"])
        self.counts = [int(c) for c in d["counts"]]


# ---------- SFT
def _pack(lengths, fits, capacity, seed):
    """Conversation indices packed greedily, in a seeded order fixed once, into rows of at most
    capacity tokens."""
    rows = []
    row = []
    used = 0
    for c in np.random.default_rng(seed).permutation(fits):
        if used + lengths[c] > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(int(c))
        used += int(lengths[c])
    rows.append(row)
    return rows


class SFTLoader:
    """Packs whole conversations into rows of block_size + 1 tokens and serves the rows in a fresh
    seeded order each epoch by PretrainLoader's global-counter rule.

    next() -> (x, y, doc_ids, state), each (B, T): y = -1 where nothing is learned (non-assistant
    tokens, padding, the jump into the next conversation); doc_ids number the conversations of a
    row 0, 1, ... (padding gets its own). Conversations longer than a row are skipped and counted
    in too_long (the trainer logs it)."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=0):
        d = Path(data_dir)
        if not (d / f"{split}_offsets.npy").exists():
            raise FileNotFoundError(f"no SFT {split} split in {d}: prepare it with "
                                    f"`python data.py --sft --input ... --out {d}`")
        self.ids = np.load(d / f"{split}_ids.npy", mmap_mode="r")
        self.mask = np.load(d / f"{split}_mask.npy", mmap_mode="r")
        self.offsets = np.load(d / f"{split}_offsets.npy")
        lengths = np.diff(self.offsets)
        fits = np.flatnonzero(lengths <= block_size + 1)
        self.too_long = len(lengths) - len(fits)
        if not len(fits):
            raise ValueError(f"no conversation in {d} {split} fits block_size + 1 = "
                             f"{block_size + 1} tokens")
        self.rows = _pack(lengths, fits, block_size + 1, seed)
        self.B = batch_size
        self.T = block_size
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.pos = 0

    def _row(self, r):
        """Row r -> (x, y, doc_ids), each (T,)."""
        ids = np.zeros(self.T + 1, dtype=np.int64)  # padding: token 0, never learned
        learn = np.zeros(self.T + 1, dtype=bool)
        doc = np.full(self.T + 1, len(self.rows[r]), dtype=np.int64)
        p = 0
        for j, c in enumerate(self.rows[r]):
            a, b = self.offsets[c], self.offsets[c + 1]
            ids[p:p + b - a] = self.ids[a:b]
            learn[p:p + b - a] = self.mask[a:b]
            doc[p:p + b - a] = j
            p += b - a
        y = np.where(learn[1:] & (doc[1:] == doc[:-1]), ids[1:], -1)
        return ids[:-1], y, doc[:-1]

    def __iter__(self):
        return self

    def __next__(self):
        g = self.pos + self.rank * self.B + np.arange(self.B)
        rows = [self._row(int(r)) for r in _shuffle(g, len(self.rows), self.seed)]
        self.pos += self.world * self.B
        x, y, doc_ids = (torch.from_numpy(np.stack(a)) for a in zip(*rows))  # each (B, T)
        return x, y, doc_ids, self.state_dict()

    def state_dict(self):
        return {"pos": self.pos, "block_size": self.T, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, d):
        if d["block_size"] != self.T or d["rows"] != len(self.rows):
            raise ValueError(f"SFT data state was saved with block_size {d['block_size']} and "
                             f"{d['rows']} rows, not {self.T} and {len(self.rows)}: resume with "
                             "the same data and block_size")
        self.pos = int(d["pos"])
