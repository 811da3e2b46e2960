"""The val split of pretraining text, which exists for any input when val_fraction > 0.

    units = val_split.hold_out_tail(units, stats, val_fraction)   # data.py's work units, streamed

data.py splits by a hash of each document (stable under reordering and resume), which lands near
val_fraction when there are many documents, but ten books rarely give one. So the rule is:
1. target = val_target(val_fraction, text bytes): val_fraction of the text, and at least
   MIN_VAL_BYTES (a few blocks to evaluate on), but never more than a tenth of the text for that
   floor: a few-thousand-token input keeps 90% for training.
2. If the documents the hash put in val hold at least target / 2 bytes, that is the split: the
   units pass through unchanged (the shards of such an input are those of the hash split alone).
3. Else the last target bytes of train text also go to val, into the last unit's val shard, so
   that one shard holds them all: whole documents from the end while each is no longer than the
   target; of a longer one only its tail, from a line break at most half the missing bytes before
   the exact cut (else the exact cut, at a character's first byte).
Sizes are bytes of UTF-8 text, known before tokenizing. Only the newest units wait for the end of
the stream: those that the tail might still reach into.
"""
import math

MIN_VAL_BYTES = 16384  # the val split's floor, in bytes of text: ~4k tokens, a few blocks of 1024


def val_target(val_fraction, text_bytes):
    """The val split's size in bytes of text (rule 1)."""
    return math.ceil(max(val_fraction * text_bytes, min(MIN_VAL_BYTES, 0.1 * text_bytes)))


def hold_out_tail(units, stats, val_fraction):
    """data.py's work units (index, train texts, val texts, bytes), streamed, with the tail of the
    text moved to val when the hash split lands too little (rules 2 and 3). stats["text_bytes"]
    counts the text read so far; stats gets val_hash_bytes, val_tail_bytes and val_tail_docs."""
    held = []  # the newest units, [unit, its train bytes]: the tail may reach into them
    for unit in units:
        val_bytes = sum(len(t.encode()) for t in unit[2])
        stats["val_hash_bytes"] += val_bytes
        held.append([unit, unit[3] - val_bytes])
        # the target grows slower than the text, so a unit behind it is never needed again
        target = val_target(val_fraction, stats["text_bytes"]) if val_fraction else 0
        while len(held) > 1 and sum(n for _, n in held[1:]) >= target:
            yield held.pop(0)[0]
    target = val_target(val_fraction, stats["text_bytes"])
    if val_fraction and stats["val_hash_bytes"] < target / 2:
        _cut_tail([unit for unit, _ in held], target, stats)
    yield from (unit for unit, _ in held)


def tail_start(b, missing):
    """Where the last `missing` bytes of the UTF-8 text b start (rule 3): just after a line break
    in the missing // 2 bytes before the cut, else at the cut, moved back to a character's first
    byte. 0: all of b."""
    cut = len(b) - missing
    newline = b.rfind(b"\n", max(1, cut - missing // 2), cut) if cut > 0 else -1
    start = newline + 1 if newline >= 0 else max(0, cut)
    while start > 0 and b[start] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        start -= 1
    return start


def _cut_tail(units, target, stats):
    """Move about target bytes from the end of the units' train texts to the last unit's val."""
    tail = []
    moved = 0
    for _, train, _, _ in reversed(units):
        while train and moved < target:
            b = train.pop().encode()
            start = tail_start(b, target - moved) if len(b) > target else 0
            if start:
                train.append(b[:start].decode())   # the head stays in train
            tail.append(b[start:].decode())
            moved += len(b) - start
    units[-1][2].extend(reversed(tail))
    stats["val_tail_bytes"] = moved
    stats["val_tail_docs"] = len(tail)
