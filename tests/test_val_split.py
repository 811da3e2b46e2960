"""A val split from any input (val_split.py through data.py), and train.py with or without one.

The tail rule is checked on made-up units against what it promises (whole documents, then the
tail of a longer one from a line break, never half a character); whole preps against an exact
round trip (train text + val text = the input) and the hash rule restated here; the real books
in ../shared/data when present. Text and tokenizers are made here.
"""
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

import bpe
import checkpoint
from conftest import SHARED_DATA, WORDS, make_docs, run_train, skip_or_fail_on_ci
import data
import llm
import readers
import sft_data
import shards
import val_split

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 1024   # train.py's default block_size: "at least one block" of val tokens in one shard


def word_lines(n_bytes, seed=0):
    """Made-up sentences of WORDS, one per line, about n_bytes of text."""
    rng = random.Random(seed)
    lines = []
    size = 0
    while size < n_bytes:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + ".")
        size += len(lines[-1]) + 1
    return "\n".join(lines)


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    """A 300-token BPE trained on word_lines text."""
    root = tmp_path_factory.mktemp("word_tok")
    (root / "corpus.txt").write_text(word_lines(50_000, seed=1))
    bpe.train([str(root / "corpus.txt")], 300, root / "tok")
    return root / "tok"


def split_texts(out, split):
    """The documents of a prepared dir's split, decoded, in shard order."""
    tok = bpe.Tokenizer.load(out)
    texts = []
    for path in sorted(Path(out).glob(f"{split}_*.bin")):
        tokens = shards.read_shard(path)
        starts = list(np.flatnonzero(tokens == tok.bos_id)) + [len(tokens)]
        texts += [tok.decode(list(tokens[a + 1:b])) for a, b in zip(starts, starts[1:])]
    return texts


def longest_val_shard(out):
    return max(len(shards.read_shard(f)) for f in Path(out).glob("val_*.bin"))


def log_rows(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


# ---------------------------------------------------------------------------------------------
# The tail rule, on made-up units


def tail_of(docs, val_fraction=0.0005, hash_val=()):
    """Run hold_out_tail on one unit per document (val: hash_val) -> (train texts, val texts)."""
    stats = dict.fromkeys(data.STATS, 0)

    def units():
        for i, d in enumerate(docs):
            stats["text_bytes"] += len(d.encode())
            val = [d] if d in hash_val else []
            yield i, [] if val else [d], val, len(d.encode())
    out = list(val_split.hold_out_tail(units(), stats, val_fraction))
    assert [u[0] for u in out] == list(range(len(docs)))
    return [t for u in out for t in u[1]], [t for u in out for t in u[2]], stats


def test_tail_takes_whole_documents_no_longer_than_the_target():
    docs = [word_lines(4000, seed=s) for s in range(50)]   # 200 kB: the target is 16,384 bytes
    train, val, stats = tail_of(docs)
    k = len(val)
    assert val == docs[-k:] and train == docs[:-k]
    assert sum(len(d) for d in val[1:]) < 16384 <= stats["val_tail_bytes"] == sum(map(len, val))


def test_tail_cuts_the_first_document_longer_than_the_target():
    """Three short documents go whole, then only the tail of the long one before them."""
    docs = [word_lines(100, seed=9), word_lines(200_000, seed=1)] + [
        word_lines(2000, seed=s) for s in range(3)]
    train, val, _ = tail_of(docs)
    assert val[1:] == docs[2:] and train[0] == docs[0]
    assert train[1] + val[0] == docs[1] and train[1].endswith("\n")   # cut at a line break
    assert 16384 <= sum(len(t) for t in val) <= 16384 + 8192


def test_a_long_document_gives_its_tail_from_a_line_break():
    doc = word_lines(200_000)
    train, val, stats = tail_of([doc])
    assert train[0] + val[0] == doc and train[0].endswith("\n")
    assert 16384 <= len(val[0].encode()) <= 1.5 * 16384


def test_tail_cut_never_splits_a_character():
    """No line break and no ASCII: the cut moves back to a character's first byte."""
    doc = "東🙂é" * 20000   # 9 bytes per repeat, no line break: the cut falls inside 🙂
    train, val, _ = tail_of([doc])
    assert train[0] + val[0] == doc and "\ufffd" not in train[0] + val[0]
    assert len(val[0].encode()) >= 16384


def test_small_input_keeps_nine_tenths_for_training():
    """A few thousand tokens of text: val is non-empty and a tenth of it (the floor's cap)."""
    doc = word_lines(6000)
    train, val, _ = tail_of([doc])
    assert train[0] + val[0] == doc
    assert 600 <= len(val[0]) <= 0.15 * len(doc)


def test_hash_split_that_lands_passes_units_unchanged():
    docs = make_docs(200)
    hash_val = set(docs[::5])   # a fifth of the documents: lands for val_fraction 0.2
    train, val, stats = tail_of(docs, 0.2, hash_val)
    assert stats["val_tail_bytes"] == 0
    assert val == [d for d in docs if d in hash_val]
    assert train == [d for d in docs if d not in hash_val]


def test_hash_split_under_half_the_target_gets_the_tail_too():
    docs = make_docs(200)
    hash_val = set(docs[:200:12])   # under a tenth of the text for val_fraction 0.2
    train, val, stats = tail_of(docs, 0.2, hash_val)
    assert val[:len(hash_val)] == [d for d in docs if d in hash_val]
    tail = val[len(hash_val):]
    assert stats["val_tail_bytes"] >= val_split.val_target(0.2, stats["text_bytes"])
    assert train + tail == [d for d in docs if d not in hash_val]   # the last train documents


def test_val_fraction_zero_holds_nothing_out():
    docs = [word_lines(50_000)]
    train, val, _ = tail_of(docs, 0)
    assert train == docs and val == []


# ---------------------------------------------------------------------------------------------
# Whole preps


def test_hash_split_is_the_documents_whose_hash_falls_under_val_fraction(tok_dir, tmp_path):
    """Restated here: the val documents of a prep whose hash split lands are exactly those whose
    blake2b digest (second half) falls under val_fraction * 2**64, as before the tail rule."""
    docs = make_docs(400, seed=11)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data.prepare([str(tmp_path / "in.jsonl")], tok_dir, tmp_path / "o", val_fraction=0.1,
                 workers=1, shard_mb=0.01)

    def is_val(d):
        h = hashlib.blake2b(d.encode(), digest_size=16).digest()
        return int.from_bytes(h[8:], "little") < int(0.1 * 2**64)
    assert split_texts(tmp_path / "o", "val") == [d for d in docs if is_val(d)]
    assert split_texts(tmp_path / "o", "train") == [d for d in docs if not is_val(d)]


def test_one_file_of_1mb_gets_a_val_split(word_tok, tmp_path):
    """One 1 MB document, default val_fraction: its tail is val, at least val_fraction of the
    tokens and a block of 1024 in one shard, and train + val give back the text exactly."""
    text = word_lines(2**20)
    (tmp_path / "book.txt").write_text(text)
    meta = data.prepare([str(tmp_path / "book.txt")], word_tok, tmp_path / "o", workers=2)
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["val_tokens"] >= 0.0005 * total and longest_val_shard(tmp_path / "o") > BLOCK
    train_texts = split_texts(tmp_path / "o", "train")
    assert "".join(train_texts) + "".join(split_texts(tmp_path / "o", "val")) == text


def test_val_fraction_zero_writes_no_val_split(word_tok, tmp_path):
    (tmp_path / "book.txt").write_text(word_lines(100_000))
    meta = data.prepare([str(tmp_path / "book.txt")], word_tok, tmp_path / "o", val_fraction=0,
                        workers=1)
    assert meta["val_tokens"] == 0 and not list((tmp_path / "o").glob("val_*"))


def test_summary_says_the_tail_was_held_out(word_tok, tmp_path, capsys):
    (tmp_path / "book.txt").write_text(word_lines(100_000))
    data.prepare([str(tmp_path / "book.txt")], word_tok, tmp_path / "o", workers=1)
    out = capsys.readouterr().out
    assert "held out 0 bytes" in out and "from the last 1 document(s), go to val as well" in out


@pytest.fixture(scope="module")
def ten_books(tmp_path_factory):
    """tiny-shakespeare and the Gutenberg folder (ten files), prepared with the defaults."""
    if not SHARED_DATA.is_dir():   # a module fixture is set up before the tests' shared_data
        skip_or_fail_on_ci("../shared/data is not present beside the checkout")
    root = tmp_path_factory.mktemp("ten")
    files = [str(SHARED_DATA / "tinyshakespeare.txt"), str(SHARED_DATA / "gutenberg")]
    bpe.train([files[0]], 512, root / "tok")
    data.prepare(files, root / "tok", root / "shards", workers=2)
    return readers.find_files(files), root / "shards"


def test_ten_books_get_a_val_split(shared_data, ten_books):
    files, out = ten_books
    assert len(files) == 10
    meta = json.loads((out / "meta.json").read_text())
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["val_tokens"] >= 0.0005 * total and longest_val_shard(out) > BLOCK
    last = data.clean(files[-1].read_text(encoding="utf-8"))[0]   # the tail of the last book
    assert split_texts(out, "train")[-1] + "".join(split_texts(out, "val")) == last


# ---------------------------------------------------------------------------------------------
# train.py


def test_train_evaluates_on_the_ten_books_val_split(shared_data, ten_books, tmp_path):
    _, out = ten_books
    run_train(["config/tiny.py", f"--data_dir={out}", f"--out_dir={tmp_path}", "--max_iters=2",
               "--eval_interval=2", "--eval_iters=1"])
    evals = [r["step"] for r in log_rows(tmp_path) if "val_loss" in r]
    assert evals == [0, 2]


@pytest.fixture(scope="module")
def no_val(word_tok, tmp_path_factory):
    """Shards of one 200 kB document prepared with --val_fraction 0."""
    root = tmp_path_factory.mktemp("no_val")
    (root / "book.txt").write_text(word_lines(200_000))
    data.main(["--input", str(root / "book.txt"), "--tokenizer", str(word_tok), "--out",
               str(root / "shards"), "--val_fraction", "0", "--workers", "1"])
    return root / "shards"


def test_train_on_one_document_evaluates_its_tail(word_tok, tmp_path):
    (tmp_path / "book.txt").write_text(word_lines(200_000))
    data.prepare([str(tmp_path / "book.txt")], word_tok, tmp_path / "shards", workers=1)
    run_train(["config/tiny.py", f"--data_dir={tmp_path / 'shards'}",
               f"--out_dir={tmp_path / 'run'}", "--max_iters=2", "--eval_interval=1",
               "--eval_iters=1"])
    assert [r["step"] for r in log_rows(tmp_path / "run") if "val_loss" in r] == [0, 1, 2]


def test_train_without_val_split_trains_without_eval(no_val, tmp_path, capsys):
    run_train(["config/tiny.py", f"--data_dir={no_val}", f"--out_dir={tmp_path}",
               "--max_iters=4", "--eval_interval=1", "--ckpt_interval=2"])
    rows = log_rows(tmp_path)
    assert not [r for r in rows if "val_loss" in r]
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2, 3, 4]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_0000002",
                                                                       "ckpt_0000004"]
    out = capsys.readouterr().out
    assert out.count("training without eval") == 1 and "eval step" not in out


def test_mixture_evaluates_the_sources_with_a_val_split(no_val, word_tok, tmp_path, capsys):
    (tmp_path / "other.txt").write_text(word_lines(100_000, seed=3))
    data.prepare([str(tmp_path / "other.txt")], word_tok, tmp_path / "other", workers=1)
    run_train(["config/tiny.py", f"--data_dir={no_val}:0.5,{tmp_path / 'other'}:0.5",
               f"--out_dir={tmp_path / 'run'}", "--max_iters=1", "--eval_interval=1"])
    row = [r for r in log_rows(tmp_path / "run") if "val_loss/other" in r][-1]
    assert not any(k.endswith(no_val.name) for k in row)
    assert f"no val split in {no_val}" in capsys.readouterr().out


def test_sft_without_val_split_trains_without_eval(word_tok, tmp_path, capsys):
    chats = [{"messages": [{"role": "user", "content": f"say {w}"},
                           {"role": "assistant", "content": w}]} for w in WORDS]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    sft_data.prepare_sft([str(tmp_path / "chat.jsonl")], word_tok, tmp_path / "chat",
                         val_fraction=0, decontaminate=False)
    tok = bpe.Tokenizer.load(word_tok)
    model = llm.LLM(llm.model_config("tiny", vocab_size=tok.vocab_size))
    checkpoint.save_checkpoint(tmp_path / "base", 0, model, {}, {}, {}, tok)
    run_train(["config/tiny.py", "--stage=sft", f"--init_from={tmp_path / 'base'}",
               f"--data_dir={tmp_path / 'chat'}", f"--out_dir={tmp_path / 'run'}",
               "--max_iters=1", "--eval_interval=1"])
    assert not [r for r in log_rows(tmp_path / "run") if "val_loss" in r]
    out = capsys.readouterr().out
    assert out.count("training without eval") == 1 and "eval step" not in out
