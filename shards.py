"""Token shards, the file format between data preparation and training; the one vocabulary limit.

    write_shard("data/x/train_000000.bin", tokens, tok.vocab_size, tok.hash)
    tokens = read_shard("data/x/train_000000.bin", vocab_size=model_vocab)  # checked uint16 memmap

A shard (.bin) is a header of 256 little-endian int32 (magic, version, vocab_size, the token count
as an int64, the first 8 bytes of the tokenizer's hash) followed by the tokens as uint16. Token ids
are uint16 everywhere (shards, SFT .npy files), so no vocabulary may exceed MAX_VOCAB: check_vocab
is the one place that says so. Bottom floor: imports no kiln module but common.
"""
import os

import numpy as np

import common

MAGIC = 0x6B696C6E  # b"kiln" read as a little-endian int32
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 65536  # uint16 token ids


def check_vocab(vocab_size, what):
    """Raise the one clear error when the vocabulary of `what` (a tokenizer, a model config...)
    does not fit uint16 token ids."""
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} of {what} is over {MAX_VOCAB}: token ids are "
                         f"stored as uint16; use a tokenizer trained with `python bpe.py "
                         f"--vocab_size {MAX_VOCAB}` or less")


def write_shard(path, tokens, vocab_size, tok_hash):
    """Write tokens as a shard, atomically: a reader never sees a half-written file."""
    check_vocab(vocab_size, f"shard {path}")
    tokens = np.asarray(tokens, dtype=np.uint16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, vocab_size
    header[3:5] = np.array([len(tokens)], dtype="<i8").view("<i4")
    header[5:7] = np.frombuffer(bytes.fromhex(tok_hash[:16].ljust(16, "0")), dtype="<i4")
    body = tokens.astype("<u2", copy=False).tobytes()
    common.write_atomic(path, header.tobytes(), body)


def shard_header(path):
    """(vocab_size, n_tokens, tokenizer hash prefix) of a shard, after checking magic, version
    and file size."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path} is truncated ({size} bytes, shorter than the header): "
                         "re-run data.py")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(f"{path} is not a kiln shard (wrong magic number): "
                         "prepare it with data.py")
    if header[1] != VERSION:
        raise ValueError(f"{path} has shard format version {header[1]}, this data.py reads "
                         f"{VERSION}: re-run data.py")
    n = int(header[3:5].copy().view("<i8")[0])
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path} is truncated: its header says {n} tokens but it holds "
                         f"{(size - HEADER_BYTES) // 2}; delete it and re-run data.py")
    return int(header[2]), n, header[5:7].tobytes().hex()


def read_shard(path, vocab_size=None):
    """The tokens of a checked shard as a read-only np.memmap (uint16); vocab_size (the model's),
    when given, must be the shard's."""
    vocab, n, _ = shard_header(path)
    if vocab_size is not None and vocab != vocab_size:
        raise ValueError(f"{path} was tokenized with vocab_size {vocab} but the model has "
                         f"{vocab_size}: use the tokenizer the data was prepared with")
    return open_tokens(path, n)


def open_tokens(path, n_tokens):
    """The tokens of a shard whose header was already checked, without reading it again."""
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
