r"""Data preparation for kiln: download, clean and tokenize text into checked uint16 shards.

    python data.py --input data/raw/ --tokenizer data/tok --out data/mydata
    python data.py --input stories.txt --txt_separator '<|endoftext|>' --tokenizer data/tok \
        --out data/stories
    python data.py --source fineweb-edu --max_shards 2 --tokenizer data/tok --out data/fineweb
    python data.py --sft --input chat.jsonl extra.parquet:0.5 --tokenizer data/tok --out data/chat
    python data.py --sft --source smoltalk --max_shards 1 --tokenizer data/tok --out data/smoltalk
    python data.py --source mmlu-aux arc-easy --tokenizer data/tok --out data/mc  # 4-choice text
    python data.py --mmlu --out data/mmlu  # fetch cais/mmlu in the original CSV layout, or check
CPU smoke run:
    python data.py --input ../shared/data/gutenberg --tokenizer /tmp/tok --out /tmp/gut --workers 2

Inputs: txt, jsonl[.gz|.zst], json[.gz], parquet, arrow. Presets: fineweb-edu, c4, wikipedia,
gutenberg, tinystories, wikitext; SFT: smoltalk, alpaca, dolly; multiple choice, as plain text or
(--sft) chat turns: mmlu-aux, arc-easy, arc-challenge, openbookqa, commonsenseqa (mc_data.py).
Books3 is no longer distributable: bring your own files with --input. --sft goes to sft_data.py,
--mmlu to mmlu.py; the shard format is in shards.py, and loader.py reads the result at training
time.

Pretraining prep: read -> clean -> drop near-empty and duplicate documents -> split train/val by a
hash of the text -> tokenize in worker processes -> shards, every document starting with <|bos|>.
Whenever --val_fraction > 0 there is a val split: when the hash split lands too little (too few or
too long documents, as ten books), the tail of the text goes to val as well (val_split.py).
A prep that is killed resumes where it stopped when run again and ends byte-identical to an
uninterrupted one: a work unit of --shard_mb MB of text becomes one shard, written to a temporary
name and renamed, and .prep_state.json records the finished ones. No torch here.
"""
import hashlib
import itertools
import json
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

import bpe
import common
import config
import mc_data
import mmlu
import readers
import sft_data
import shards
import val_split

MIN_CHARS = 10  # documents shorter than this after cleaning are "near-empty" and dropped

# Hub presets: (repo, file patterns, text field); the SFT ones are read as chat records.
PRESETS = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", ["sample/10BT/*.parquet"], "text"),
    "c4": ("allenai/c4", ["en/c4-train.*.json.gz"], "text"),
    "wikipedia": ("wikimedia/wikipedia", ["20231101.en/*.parquet"], "text"),
    "gutenberg": ("manu/project_gutenberg", ["data/en-*.parquet"], "text"),
    "tinystories": ("roneneldan/TinyStories", ["data/train-*.parquet"], "text"),
    "wikitext": ("Salesforce/wikitext", ["wikitext-103-raw-v1/train-*.parquet"], "text"),  # lines
    "smoltalk": ("HuggingFaceTB/smoltalk", ["data/all/train-*.parquet"], "messages"),
    "alpaca": ("tatsu-lab/alpaca", ["data/train-*.parquet"], None),
    "dolly": ("databricks/databricks-dolly-15k", ["databricks-dolly-15k.jsonl"], None),
}
SFT_PRESETS = ("smoltalk", "alpaca", "dolly")
STATS = ("docs_read", "docs_kept", "gutenberg_stripped", "dropped_empty", "dropped_duplicate",
         "utf8_replaced", "text_bytes", "val_hash_bytes", "val_tail_bytes", "val_tail_docs")


# ---------- Reading and cleaning
_PG_START = re.compile(r"^\*\*\* ?START OF.*$", re.M)
_PG_END = re.compile(r"^\*\*\* ?END OF", re.M)
_PG_LAST = re.compile(r"^End of (the )?Project Gutenberg", re.M)  # the book's own closing line
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def clean(text):
    """(text, stripped_gutenberg): BOM removed, newlines normalised to \n, the Project Gutenberg
    header and licence footer cut, outer whitespace stripped."""
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


def _txt_documents(path, txt_separator, stats):
    """A txt file's documents; invalid UTF-8 is replaced (U+FFFD) and counted, never a crash."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        bad = False
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        bad = True
    for part in text.split(txt_separator) if txt_separator else [text]:
        stats["utf8_replaced"] += bad and "\ufffd" in part
        yield part


def _read_wikitext(path, text_field):
    """wikitext rows are single lines: join them into articles, cut before each title line."""
    article = []
    for line in readers.iter_texts([path], text_field):
        if _WIKITEXT_TITLE.match(line) and article:
            yield "".join(article)
            article = []
        article.append(line)
    yield "".join(article)


def iter_docs(files, text_field, txt_separator, stats, wikitext=False):
    """Raw documents in file order; --txt_separator splits a txt file into documents."""
    for path in files:
        if path.name.endswith(".txt"):
            yield from _txt_documents(path, txt_separator, stats)
        elif wikitext:
            yield from _read_wikitext(path, text_field)
        else:
            yield from readers.iter_texts([path], text_field)


def _units(docs, stats, shard_bytes, val_fraction, max_docs):
    """Clean, drop near-empty and duplicate documents, split train/val by a hash of the text
    (stable under any reordering or resume), and cut the stream into work units of about
    shard_bytes of UTF-8 text: (index, train texts, val texts, bytes)."""
    seen = set()
    train = []
    val = []
    size = 0
    i = 0
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
            i += 1
            train, val = [], []
            size = 0
    if train or val:
        yield i, train, val, size


# ---------- Tokenizing, in worker processes
_TOK = None  # the tokenizer of this worker process


def _init_worker(tok_dir, in_process):
    global _TOK
    # several worker processes already fill the cores: tokenizers' threads would oversubscribe
    if not in_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _TOK = bpe.Tokenizer.load(tok_dir)


def _exit_with_parent(parent):
    """A prep killed with SIGKILL must not leave idle workers behind."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _encode(texts, batch_chars):
    """texts -> one uint16 array, each document as <|bos|> + its ids. Encoded in batches of about
    batch_chars, so that the Python lists of ids stay a few MB."""
    parts = [np.zeros(0, dtype=np.uint16)]
    j = 0
    while j < len(texts):
        k = j + 1
        n = len(texts[j])
        while k < len(texts) and n < batch_chars:
            n += len(texts[k])
            k += 1
        flat = []
        for ids in _TOK.encode_batch(texts[j:k]):
            flat.append(_TOK.bos_id)
            flat += ids
        parts.append(np.array(flat, dtype=np.uint16))
        j = k
    return np.concatenate(parts)


def _tokenize_unit(out_dir, i, train, val, batch_chars=1 << 22):
    """One work unit -> train_{i:06d}.bin and (if it has val documents) val_{i:06d}.bin."""
    counts = {}
    for split, texts in (("train", train), ("val", val)):
        tokens = _encode(texts, batch_chars)
        counts[split] = len(tokens)
        if texts:
            path = Path(out_dir) / f"{split}_{i:06d}.bin"
            shards.write_shard(path, tokens, _TOK.vocab_size, _TOK.hash)
    return i, counts


# ---------- Pretraining prep
def _open_state(out, settings):
    """The resume state of out: the finished units of an earlier run of this same prep, or a fresh
    one. Another prep's folder is refused, never mixed into."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp*"):  # temporary files of a killed run
        stale.unlink()
    state_file = out / ".prep_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if state and state["settings"] != settings:
        raise ValueError(f"{out} holds a prep of other inputs or settings: use a new --out or "
                         "delete it")
    if not state and any(out.glob("*.bin")):
        raise ValueError(f"{out} already holds shards from another prep: use a new --out or "
                         "delete it")
    return state or {"settings": settings, "done": {}}


def _run_units(units, out, state, workers, bar):
    """Tokenize the units not finished yet, at most 2 per worker in flight, and record each
    finished one in .prep_state.json."""
    pause = float(os.environ.get("KILN_PREP_SLEEP", 0))  # tests kill a slowed prep midway
    state_file = out / ".prep_state.json"
    t0 = time.time()
    tokens_done = 0

    def finish(i, counts, size):
        nonlocal tokens_done
        state["done"][str(i)] = counts
        common.write_atomic(state_file, json.dumps(state, sort_keys=True).encode())
        tokens_done += counts["train"] + counts["val"]
        bar.update(size)
        bar.set_postfix(tokens_per_s=f"{tokens_done / (time.time() - t0):,.0f}")
        time.sleep(pause)

    # workers=1 tokenizes in a thread of this process: no process start-up, tokenizers' own threads
    if workers > 1:
        pool = ProcessPoolExecutor(workers, get_context("spawn"), initializer=_init_worker,
                                   initargs=(out, False))
    else:
        pool = ThreadPoolExecutor(1, initializer=_init_worker, initargs=(out, True))
    with pool:
        pending = {}
        for i, train, val, size in units:
            done = state["done"].get(str(i))
            names = [f"{s}_{i:06d}.bin" for s in ("train", "val") if done and done[s]]
            if done and all((out / name).exists() for name in names):
                continue  # finished by an earlier run
            pending[pool.submit(_tokenize_unit, out, i, train, val)] = size
            while len(pending) >= 2 * workers:  # bounded: never read far ahead of the workers
                for f in wait(pending, return_when=FIRST_COMPLETED).done:
                    finish(*f.result(), pending.pop(f))
        for f in list(pending):
            finish(*f.result(), pending.pop(f))


def _report(out, n, stats, val_fraction):
    print(f"{out}: {n['train']:,} train + {n['val']:,} val tokens from {stats['docs_kept']:,} "
          f"documents ({stats['text_bytes'] / 2**20:,.1f} MB); dropped {stats['dropped_empty']} "
          f"near-empty and {stats['dropped_duplicate']} duplicates; {stats['gutenberg_stripped']} "
          f"Gutenberg headers stripped; {stats['utf8_replaced']} documents had invalid UTF-8 "
          "(replaced with U+FFFD)")
    if stats["val_tail_bytes"]:
        target = val_split.val_target(val_fraction, stats["text_bytes"])
        print(f"val: the split by document hash held out {stats['val_hash_bytes']:,} bytes of "
              f"text, under half of the {target:,} wanted (too few or too long documents), so the "
              f"last {stats['val_tail_bytes']:,} bytes of text, from the last "
              f"{stats['val_tail_docs']} document(s), go to val as well")


def prepare(inputs, tokenizer, out_dir, text_field="text", val_fraction=0.0005, workers=None,
            txt_separator=None, max_docs=None, shard_mb=None, wikitext=False):
    """Tokenize local files into out_dir (train_*.bin, val_*.bin, meta.json, tokenizer copy);
    returns meta. Resumes a killed run of the same prep, then ends byte-identical to an
    uninterrupted one."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction {val_fraction} must be in [0, 1)")
    tok = bpe.load_for_data(tokenizer)
    paths = [inputs] if isinstance(inputs, (str, Path)) else inputs
    files = readers.find_files([str(p) for p in paths])
    workers = workers or os.cpu_count()
    stats = dict.fromkeys(STATS, 0)
    # Each shard is one work unit of a worker: about 1/64 of the input, so that small inputs still
    # keep every core busy, between 1 and 100 MB of text. It depends only on the inputs: every
    # machine writes the same shards.
    input_mb = sum(f.stat().st_size for f in files) / 2**20
    shard_mb = shard_mb or min(100.0, max(1.0, input_mb / 64))
    docs = iter_docs(files, text_field, txt_separator, stats, wikitext)
    units = _units(docs, stats, int(shard_mb * 2**20), val_fraction, max_docs)
    units = val_split.hold_out_tail(units, stats, val_fraction)
    first = next(units, None)  # a bad file or field fails here, before anything is written
    if first is None:
        raise ValueError(f"no documents left in {[str(f) for f in files]} after cleaning "
                         f"({stats['docs_read']} read, {stats['dropped_empty']} empty, "
                         f"{stats['dropped_duplicate']} duplicates)")
    sources = [{"name": f.name, "path": str(f), "bytes": f.stat().st_size,
                "sha256": common.sha256_file(f)} for f in files]
    settings = {"sources": [[s["name"], s["sha256"]] for s in sources], "tokenizer_hash": tok.hash,
                "text_field": text_field, "val_fraction": val_fraction,
                "txt_separator": txt_separator, "max_docs": max_docs, "shard_mb": shard_mb,
                "wikitext": wikitext, "min_val_bytes": val_split.MIN_VAL_BYTES,
                "version": shards.VERSION}
    out = Path(out_dir)
    state = _open_state(out, settings)
    tok.save(out)  # tokenizer.json is saved byte for byte, so the hash is unchanged
    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=f"tokenizing into {out}",
               smoothing=0.1)
    _run_units(itertools.chain([first], units), out, state, workers, bar)
    bar.close()
    n = {s: sum(c[s] for c in state["done"].values()) for s in ("train", "val")}
    meta = {"kind": "pretrain", "format_version": shards.VERSION, "tokenizer_hash": tok.hash,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "sources": sources,
            "settings": settings, "docs": stats, "train_tokens": n["train"],
            "val_tokens": n["val"], "train_shards": len(list(out.glob("train_*.bin"))),
            "val_shards": len(list(out.glob("val_*.bin")))}
    common.write_json(out / "meta.json", meta, indent=1)
    _report(out, n, stats, val_fraction)
    return meta


# ---------- Command line
@dataclass
class Args:
    input: list[str] | None = None   # files, folders or globs (SFT: each may end in :WEIGHT)
    source: list[str] | None = None  # hub preset(s) (default fineweb-edu; with --sft smoltalk)
    tokenizer: str | None = None     # a kiln tokenizer dir (bpe.py --out)
    out: str | None = None           # output dir (default for one preset: data/PRESET)
    text_field: str | None = None    # text column of jsonl/parquet/arrow (default: text)
    val_fraction: float | None = None  # held-out share (default 0.0005, SFT 0.02)
    workers: int | None = None       # tokenizer processes (default: all cores)
    txt_separator: str | None = None  # split .txt files into documents here (\n escapes work)
    max_docs: int | None = None      # stop after this many documents
    max_shards: int | None = None    # download at most this many files per preset
    shard_mb: float | None = None    # MB of text per shard (default: input/64, 1 to 100)
    sft: bool = False                # prepare SFT chat data (sft_data.py)
    max_len: int = 2048              # SFT: longest conversation kept, in tokens
    mmlu_dir: str | None = None      # SFT, multiple choice: MMLU folder to decontaminate against
    no_decontam: bool = False        # SFT, multiple choice: keep what overlaps MMLU test
    mmlu: bool = False               # fetch cais/mmlu into --out (CSV layout) or check it


def _preset_inputs(a):
    """--source presets -> (input paths, text field), downloading or finding them in the cache."""
    inputs = []
    field = a.text_field
    for name, weight in readers.parse_weighted(a.source or []):
        if name in mc_data.MC_PRESETS:  # rendered by _mc_inputs, for either kind of prep
            continue
        if name not in PRESETS or (name in SFT_PRESETS) != a.sft:
            if name.lower() == "books3":
                raise ValueError("Books3 is no longer distributable: bring your own local files "
                                 "with --input PATH")
            kind = SFT_PRESETS if a.sft else [p for p in PRESETS if p not in SFT_PRESETS]
            kind = [*kind, *mc_data.MC_PRESETS]
            raise ValueError(f"unknown {'SFT ' if a.sft else ''}preset {name!r}: use one of "
                             f"{', '.join(kind)}")
        repo, patterns, preset_field = PRESETS[name]
        field = field or preset_field
        files = readers.hub_files(name, repo, patterns, a.max_shards)
        inputs += [f"{f}:{weight}" for f in files] if a.sft else [str(f) for f in files]
    return inputs, field


def _mc_inputs(a, grams):
    """--source's multiple-choice presets, rendered (mc_data.py) -> (input paths, counts)."""
    inputs = []
    counts = {}
    for name, weight in readers.parse_weighted(a.source or []):
        if name in mc_data.MC_PRESETS:
            repo, patterns, _, _ = mc_data.MC_PRESETS[name]
            files = readers.hub_files(name, repo, patterns, a.max_shards)
            path, counts[name] = mc_data.render(name, files, a.sft, a.out, grams)
            inputs.append(f"{path}:{weight}" if a.sft else str(path))
    return inputs, counts


def _check_args(a):
    """Refuse a bad command line before any download; fill in the default preset and --out."""
    if not a.tokenizer:
        raise ValueError("give --tokenizer DIR: a folder written by `python bpe.py ... --out DIR`")
    bpe.load_for_data(a.tokenizer, need_bos=not a.sft)  # a bad tokenizer fails now, not later
    if a.input and a.source:
        raise ValueError("give either --input PATH... or --source PRESET, not both "
                         "(see python data.py --help)")
    if not a.input and not a.source:
        a.source = ["smoltalk" if a.sft else "fineweb-edu"]  # the default presets
    if not a.out:
        if a.input or len(a.source) > 1:
            raise ValueError("give --out DIR: where to write the prepared data")
        a.out = f"data/{a.source[0]}"  # where config/pretrain_1b.py and config/sft.py look
    if not a.sft and any(":" in s for s in a.source or []):
        raise ValueError("weights on --source are for SFT mixtures; for pretraining prepare each "
                         "source into its own --out and mix at train time: "
                         "--data_dir=data/a:0.7,data/b:0.3")


def main(argv=None):
    a = config.parse_args(Args(), argv, doc=__doc__)
    if a.mmlu:
        mmlu.fetch_or_check(a.out or "data/mmlu")
        return
    _check_args(a)
    found, field = _preset_inputs(a)
    mc_found, mc_counts = [], {}
    if any(name in mc_data.MC_PRESETS for name, _ in readers.parse_weighted(a.source or [])):
        grams, _ = sft_data.decontamination_grams(a.mmlu_dir, not a.no_decontam)
        mc_found, mc_counts = _mc_inputs(a, grams)
    inputs = list(a.input or []) + found + mc_found
    if a.sft:
        val_fraction = 0.02 if a.val_fraction is None else a.val_fraction
        meta = sft_data.prepare_sft(inputs, a.tokenizer, a.out, a.max_len, val_fraction,
                                    a.mmlu_dir, not a.no_decontam)
    else:
        sep = a.txt_separator.encode().decode("unicode_escape") if a.txt_separator else None
        val_fraction = 0.0005 if a.val_fraction is None else a.val_fraction
        meta = prepare(inputs, a.tokenizer, a.out, field or "text", val_fraction, a.workers, sep,
                       a.max_docs, a.shard_mb, wikitext=a.source == ["wikitext"])
    if mc_counts:  # the summary keeps what each multiple-choice source lost, and why
        meta["multiple_choice"] = mc_counts
        common.write_json(Path(a.out) / "meta.json", meta, indent=1)


if __name__ == "__main__":
    common.cli(main)
