"""SFT chat data: records in the common formats -> conversations -> (ids, mask), decontaminated.

    python data.py --sft --input chat.jsonl extra.parquet:0.5 --tokenizer data/tok --out data/chat
    prepare_sft(["chat.jsonl"], "data/tok", "data/chat", max_len=2048)  # the same, from Python

Conversations are rendered with the tokenizer's chat template: kiln's own, or the one a Hugging
Face tokenizer folder carries (--tokenizer HF_DIR); the loss mask is 1 exactly on each assistant
message and its end-of-turn marker. Record formats: messages (role/content), conversations
(from/value), alpaca (instruction/input/output), dolly (instruction/context/response),
self-instruct (instruction/instances), question/answer (gsm8k). Records that share a 13-word
n-gram with an MMLU test question are dropped (GPT-3's contamination check). Output:
{train,val}_{ids (uint16), mask (uint8), offsets (int64)}.npy, meta.json and the tokenizer (with
its chat template); loader.SFTLoader packs them into rows.
"""
import hashlib
import io
import re
from pathlib import Path

import numpy as np

import bpe
import common
import mmlu
import readers

ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
              "gpt": "assistant"}


def _chat_messages(raw):
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        return None
    return [{"role": ROLE_NAMES.get(m.get("role", m.get("from"))),
             "content": m.get("content", m.get("value"))} for m in raw]


def _instruction_messages(r):
    """alpaca (input/output), dolly (context/response), self-instruct (instances)."""
    first = (r.get("instances") or [{}])[0] if isinstance(r.get("instances"), list) else {}
    first = first if isinstance(first, dict) else {}
    extra = r.get("input", r.get("context", first.get("input"))) or ""
    answer = r.get("output", r.get("response", first.get("output")))
    if not all(isinstance(x, str) for x in (r["instruction"], extra, answer)):
        return None
    question = r["instruction"] + ("\n\n" + extra if extra.strip() else "")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def to_messages(r):
    """(messages, None) or (None, reason) for one record of a known SFT format."""
    if not isinstance(r, dict):
        return None, "bad_json" if r is None else "not_an_object"
    if "messages" in r or "conversations" in r:
        msgs = _chat_messages(r.get("messages", r.get("conversations")))
    elif "instruction" in r:
        msgs = _instruction_messages(r)
    elif "question" in r and "answer" in r:  # gsm8k
        msgs = [{"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]}]
    else:
        return None, "unknown_format"
    if msgs is None or any(m["role"] is None or not isinstance(m["content"], str) for m in msgs):
        return None, "bad_messages"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        return None, "no_assistant"
    if any(not m["content"].strip() for m in msgs if m["role"] == "user"):
        return None, "empty_user"
    return msgs, None


def ngrams(text, n=13):
    """Lowercased word n-grams: GPT-3's contamination check."""
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _render(r, tokenizer, max_len, grams):
    """((ids, mask), None) for a record to keep, or (None, why it is dropped)."""
    msgs, why = to_messages(r)
    if why:
        return None, why
    if grams and ngrams("\n".join(m["content"] for m in msgs)) & grams:
        return None, "contaminated"
    try:
        ids, mask = tokenizer.render_chat(msgs)
    except ValueError:  # roles out of order
        return None, "bad_messages"
    return ((ids, mask), None) if len(ids) <= max_len else (None, "too_long")


def load_sft(inputs, tokenizer, max_len, grams=None):
    """(convs, counts): convs = [(ids, mask)] rendered by tokenizer.render_chat (the model's chat
    template; the mask is 1 on each assistant message and its end-of-turn marker) from jsonl
    (.gz/.zst), json or parquet records; inputs may carry weights ("chat.jsonl:2" repeats, ":0.5"
    keeps the first half). Records that are malformed, longer than max_len tokens or (with grams)
    overlapping MMLU are counted, not kept."""
    convs, counts = [], {"records": 0, "kept": 0}
    for name, weight in readers.parse_weighted(inputs):
        mine = []
        for path in readers.find_files([name]):
            for r in readers.iter_records(path):
                counts["records"] += 1
                conv, why = _render(r, tokenizer, max_len, grams)
                if why:
                    counts[why] = counts.get(why, 0) + 1
                else:
                    mine.append(conv)
        counts["kept"] += len(mine)
        convs += mine * int(weight) + mine[:round((weight % 1) * len(mine))]
    if not convs:
        raise ValueError(f"no usable SFT records in {inputs}: {counts}; records need messages "
                         "(role/content), conversations (from/value), instruction/output or "
                         "question/answer")
    return convs, counts


def mmlu_grams(mmlu_dir):
    """The 13-grams of every MMLU test question in mmlu_dir."""
    subjects = mmlu.load_mmlu(mmlu_dir, "test").values()
    questions = (it["question"] for items in subjects for it in items)
    return set().union(*map(ngrams, questions))


def decontamination_grams(mmlu_dir=None, decontaminate=True):
    """(13-grams of MMLU's test questions or None, the MMLU folder used): mmlu_dir, else data/mmlu
    or ../shared/data/mmlu; None (said once) when decontaminate is off or there is no folder."""
    mmlu_dir = mmlu_dir or mmlu.default_mmlu_dir()
    if decontaminate and mmlu_dir is None:
        print("note: no MMLU folder (data/mmlu or ../shared/data/mmlu) so no decontamination; "
              "fetch one with `python data.py --mmlu --out data/mmlu`")
    if not decontaminate or mmlu_dir is None:
        return None, None
    return mmlu_grams(mmlu_dir), mmlu_dir


def _val_split(convs, val_fraction):
    """A boolean per conversation, True for val: decided by a hash of the ids, so it is stable and
    the repeated copies of a record land on the same side."""
    digests = (hashlib.blake2b(np.asarray(ids, np.uint16).tobytes(), digest_size=8).digest()
               for ids, _ in convs)
    keys = [int.from_bytes(d, "little") for d in digests]
    is_val = np.array(keys, dtype=np.uint64) < np.uint64(int(val_fraction * 2**64))
    if val_fraction > 0 and not is_val.any() and len(set(keys)) > 1:
        is_val = np.array(keys) == min(keys)  # a tiny set still gets a val split
    return is_val


def _write_split(out, split, part):
    """part: [(ids, mask)] -> out/{split}_{ids,mask,offsets}.npy, the conversations end to end."""
    id_parts = [np.asarray(ids, np.uint16) for ids, _ in part] or [np.zeros(0, np.uint16)]
    mask_parts = [np.asarray(m, np.uint8) for _, m in part] or [np.zeros(0, np.uint8)]
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in part])]).astype(np.int64)
    arrays = {"ids": np.concatenate(id_parts), "mask": np.concatenate(mask_parts),
              "offsets": offsets}
    for name, a in arrays.items():
        buf = io.BytesIO()
        np.save(buf, a)
        common.write_atomic(out / f"{split}_{name}.npy", buf.getbuffer())


def prepare_sft(inputs, tokenizer, out_dir, max_len=2048, val_fraction=0.02, mmlu_dir=None,
                decontaminate=True):
    """Write an SFT dir: {train,val}_{ids (uint16), mask (uint8), offsets (int64)}.npy, meta.json,
    tokenizer; returns meta."""
    tok = bpe.load_for_data(tokenizer, need_bos=False)  # the chat template writes what it needs
    grams, mmlu_dir = decontamination_grams(mmlu_dir, decontaminate)
    convs, counts = load_sft(inputs, tok, max_len, grams)
    is_val = _val_split(convs, val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    for split, sel in (("train", ~is_val), ("val", is_val)):
        _write_split(out, split, [c for c, s in zip(convs, sel) if s])
    meta = {"kind": "sft", "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size,
            "max_len": max_len, "inputs": [str(i) for i in inputs], "val_fraction": val_fraction,
            "counts": counts,
            "decontamination": {"mmlu_dir": str(mmlu_dir) if grams else None, "ngram": 13,
                                "removed": counts.get("contaminated", 0)},
            "train_conversations": int((~is_val).sum()),
            "val_conversations": int(is_val.sum())}
    common.write_json(out / "meta.json", meta, indent=1)
    print(f"{out}: {meta['train_conversations']} train + {meta['val_conversations']} val "
          f"conversations; {counts}")
    return meta
