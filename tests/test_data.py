"""data.py: shards, prep (formats, cleaning, resume after SIGKILL, errors), readers, SFT data, MMLU loading."""
import csv
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bpe
from conftest import skip_or_fail_on_ci
import data

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a river stone lantern quiet seven clock garden north paper window early silver orchard thunder "
         "Zürich café naïve 東京 Привет 🙂 don't it's 1999 42.5 (note) -- hello, world!").split()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "corpus.txt").write_text("\n\n".join(make_docs(200, seed=1)), encoding="utf-8")
    out = tmp_path_factory.mktemp("tok")
    bpe.train([str(folder / "corpus.txt")], 400, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return bpe.Tokenizer.load(tok_dir)


def split_docs(tokens, bos):
    """Token stream -> list of documents (token lists), each of which started with bos."""
    starts = list(np.flatnonzero(np.asarray(tokens) == bos)) + [len(tokens)]
    assert starts[0] == 0
    return [list(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])]


def bins(folder):
    return {f.name: f.read_bytes() for f in sorted(Path(folder).glob("*.bin"))}


# ---------------------------------------------------------------------------------------------------------
# Shards


def test_shard_round_trip_and_header_errors(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50000, size=1000)
    data.write_shard(tmp_path / "a.bin", tokens, 50000, "ab" * 32)
    assert np.array_equal(data.read_shard(tmp_path / "a.bin", 50000), tokens)
    assert data.shard_header(tmp_path / "a.bin") == (50000, 1000, "ab" * 8)
    raw = (tmp_path / "a.bin").read_bytes()
    assert len(raw) == 1024 + 2000 and np.array_equal(np.frombuffer(raw[1024:], "<u2"), tokens)
    assert not list(tmp_path.glob("*.tmp*"))

    (tmp_path / "trunc.bin").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="truncated"):
        data.read_shard(tmp_path / "trunc.bin")
    (tmp_path / "short.bin").write_bytes(raw[:100])
    with pytest.raises(ValueError, match="truncated"):
        data.read_shard(tmp_path / "short.bin")
    (tmp_path / "magic.bin").write_bytes(b"\0\0\0\0" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        data.read_shard(tmp_path / "magic.bin")
    with pytest.raises(ValueError, match="vocab_size 50000 but the model has 32768"):
        data.read_shard(tmp_path / "a.bin", vocab_size=32768)
    with pytest.raises(ValueError, match="uint16"):
        data.write_shard(tmp_path / "big.bin", tokens, 70000, "ab" * 32)
    assert not (tmp_path / "big.bin").exists()


# ---------------------------------------------------------------------------------------------------------
# Prep


def write_formats(folder, docs):
    """The same documents as parquet, arrow (IPC stream, as the datasets cache), jsonl.gz, jsonl.zst and txt."""
    folder.mkdir()
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, folder / "d.parquet", row_group_size=7)
    with pa.OSFile(str(folder / "d.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=5)
    lines = "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)).encode()
    (folder / "d.jsonl.gz").write_bytes(gzip.compress(lines))
    with pa.CompressedOutputStream(str(folder / "d.jsonl.zst"), "zstd") as f:
        f.write(lines)
    (folder / "txt").mkdir()
    for i, d in enumerate(docs):
        (folder / "txt" / f"doc_{i:04d}.txt").write_text(d, encoding="utf-8")
    (folder / "all.txt").write_text("<|sep|>".join(docs), encoding="utf-8")


def test_all_formats_give_identical_shards(tok, tok_dir, tmp_path):
    docs = make_docs(60)
    write_formats(tmp_path / "in", docs)
    results = {}
    for name in ["d.parquet", "d.arrow", "d.jsonl.gz", "d.jsonl.zst", "txt", "all.txt"]:
        out = tmp_path / name.replace(".", "_")
        sep = "<|sep|>" if name == "all.txt" else None
        data.prepare([str(tmp_path / "in" / name)], tok_dir, out, val_fraction=0.2, workers=1, txt_separator=sep,
                     shard_mb=0.002)
        results[name] = bins(out)
    reference = results.pop("d.parquet")
    assert len([n for n in reference if n.startswith("train")]) > 1 and any(n.startswith("val") for n in reference)
    for name, got in results.items():
        assert got == reference, name
    # independent check of the content: decoding each shard's documents gives back the input documents
    out = tmp_path / "d_parquet"
    got = {}
    for f in sorted(out.glob("*.bin")):
        for ids in split_docs(data.read_shard(f, tok.vocab_size), tok.bos_id):
            got[tok.decode(ids)] = f.name[:3]
    assert sorted(got) == sorted(docs)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(data.read_shard(f)) for f in out.glob("*.bin"))
    assert meta["val_tokens"] == sum(len(data.read_shard(f)) for f in out.glob("val_*.bin")) > 0
    assert meta["tokenizer_hash"] == tok.hash == bpe.Tokenizer.load(out).hash
    # the val split is decided per document, not by position: the same docs in another order, same split
    data.prepare([str(tmp_path / "in" / "d.parquet")], tok_dir, tmp_path / "again", val_fraction=0.2, workers=1)
    rev = tmp_path / "rev.jsonl"
    rev.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    data.prepare([str(rev)], tok_dir, tmp_path / "rev", val_fraction=0.2, workers=1)
    val = [tok.decode(ids) for ids in split_docs(data.read_shard(tmp_path / "again" / "val_000000.bin"), 0)]
    val_rev = [tok.decode(ids) for ids in split_docs(data.read_shard(tmp_path / "rev" / "val_000000.bin"), 0)]
    assert sorted(val) == sorted(val_rev) == sorted(d for d, split in got.items() if split == "val")


def test_cleaning_counts_and_invalid_utf8(tok, tok_dir, tmp_path):
    docs = make_docs(5, seed=3)
    (tmp_path / "in").mkdir()
    rows = ["\ufeff" + docs[0].replace(" ", "\r\n", 3), docs[1], docs[1], "   \n ", "tiny", docs[2], docs[0]]
    pq.write_table(pa.table({"text": rows}), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "bad.txt").write_bytes(docs[3].encode() + b" \xff\xfe broken " + b"\xc3")
    meta = data.prepare([str(tmp_path / "in")], tok_dir, tmp_path / "out", val_fraction=0, workers=1)
    c = meta["docs"]
    # docs[0] with CRLF and BOM cleans to docs[0] with \n, which is not a duplicate of docs[0] itself
    assert (c["docs_read"], c["docs_kept"], c["dropped_empty"], c["dropped_duplicate"], c["utf8_replaced"]) == \
        (8, 5, 2, 1, 1)
    got = [tok.decode(ids) for ids in split_docs(data.read_shard(tmp_path / "out" / "train_000000.bin"), 0)]
    assert got == [docs[0].replace(" ", "\n", 3), docs[1], docs[2], docs[0],
                   docs[3] + " \ufffd\ufffd broken \ufffd"]


@pytest.mark.parametrize("name", ["11-0.txt", "3261.txt"])  # "*** START OF" and "***START OF"
def test_gutenberg_header_and_footer_stripped(shared_data, name):
    path = shared_data / "gutenberg" / name
    if not path.exists():
        skip_or_fail_on_ci(f"no {path}")
    raw = path.read_bytes().decode("utf-8")
    lines = raw.lstrip("\ufeff").split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith("***STARTOF"))
    end = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith("***ENDOF"))
    body = lines[start + 1:end]
    closing = [i for i, line in enumerate(body) if line.startswith("End of") and "Project Gutenberg" in line]
    text, stripped = data.clean(raw)
    assert stripped and text == "\n".join(body[:closing[-1]] if closing else body).strip()
    assert "Gutenberg" not in text[-5000:] and "\r" not in text and "\ufeff" not in text
    assert 0.8 * len(raw) < len(text) < len(raw) - 15000  # the licence (~18 kB) and header went, the book stayed


def test_errors_leave_no_partial_shard(tok_dir, tmp_path):
    pq.write_table(pa.table({"content": make_docs(3)}), tmp_path / "nofield.parquet")
    with pytest.raises(ValueError, match="has no field 'text'"):
        data.prepare([str(tmp_path / "nofield.parquet")], tok_dir, tmp_path / "o1", workers=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="matches no"):
        data.prepare([str(tmp_path / "empty")], tok_dir, tmp_path / "o2", workers=1)
    (tmp_path / "blank.txt").write_text("  \n\n  ")
    with pytest.raises(ValueError, match="no documents left"):
        data.prepare([str(tmp_path / "blank.txt")], tok_dir, tmp_path / "o3", workers=1)
    # a tokenizer whose ids do not fit uint16, refused before anything is read or written
    import tokenizers
    big = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0"))
    with pytest.raises(ValueError, match="65536"):
        data.prepare([str(tmp_path / "blank.txt")], bpe.Tokenizer(big.to_str().encode()), tmp_path / "o4")
    # weights on pretraining presets would be dropped silently: refused, before any download
    with pytest.raises(ValueError, match="weights on --source are for SFT"):
        data.main(["--source", "fineweb-edu:0.7", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o6")])
    for out in ["o1", "o2", "o3", "o4"]:
        assert not list((tmp_path / out).glob("**/*.bin")), out
    assert not (tmp_path / "o4").exists()
    # the command line gives one line on stderr and exit status 2
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "--input", str(tmp_path / "nofield.parquet"),
                        "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o5")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_sigkill_then_rerun_is_byte_identical(tok_dir, tmp_path):
    docs = make_docs(40, seed=5)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    args = dict(val_fraction=0.25, shard_mb=1e-6)  # one document per shard: many shards
    data.prepare([str(tmp_path / "in.jsonl")], tok_dir, tmp_path / "ref", workers=1, **args)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "data.py"), "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tok_dir),
           "--out", str(out), "--workers", "2", "--val_fraction", "0.25", "--shard_mb", "1e-6"]
    proc = subprocess.Popen(cmd, env={**os.environ, "KILN_PREP_SLEEP": "0.3"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob("train_*.bin"))) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the prep and its worker processes
    proc.wait()
    assert not (out / "meta.json").exists(), "prep finished before it could be killed"
    partial = bins(out)
    assert 0 < len(partial) < len(bins(tmp_path / "ref"))
    for name, content in partial.items():  # what exists is complete
        assert content == (tmp_path / "ref" / name).read_bytes()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert bins(out) == bins(tmp_path / "ref")
    assert (out / "meta.json").read_bytes() == (tmp_path / "ref" / "meta.json").read_bytes()
    assert not list(out.glob("*.tmp*"))
    # a different prep into the same folder is refused, not mixed in
    with pytest.raises(ValueError, match="other inputs or settings"):
        data.prepare([str(tmp_path / "in.jsonl")], tok_dir, out, workers=1, val_fraction=0.5, shard_mb=1e-6)


def test_offline_preset_is_one_clear_line(tok_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "--source", "fineweb-edu", "--max_shards", "1",
                        "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "HuggingFaceFW/fineweb-edu" in r.stderr and "hf download" in r.stderr and "--input" in r.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------
# Pretraining reader


def make_dir(folder, lengths, vocab=1000, offset=0, tok_hash="0" * 64):
    folder.mkdir()
    start = offset
    for i, n in enumerate(lengths):
        data.write_shard(folder / f"train_{i:06d}.bin", (np.arange(start, start + n)) % vocab, vocab, tok_hash)
        start += n
    return folder


def test_permute_is_a_bijection():
    for n in [1, 2, 3, 7, 64, 1000, 4097]:
        p = data._permute(np.arange(n), n, key=12345)
        assert sorted(p) == list(range(n))
    assert not np.array_equal(data._permute(np.arange(1000), 1000, 1), data._permute(np.arange(1000), 1000, 2))


@pytest.mark.parametrize("sequential", [True, False])
def test_reader_covers_every_token_once_per_epoch_on_1_and_2_ranks(tmp_path, sequential):
    T, B = 8, 3
    d = make_dir(tmp_path / "d", [5 * T + 1, 7 * T + 1], vocab=60000)  # 12 windows; every token used
    tokens = np.concatenate([data.read_shard(f) for f in sorted(d.glob("*.bin"))]).astype(np.int64)
    one = data.PretrainLoader(str(d), "train", 2 * B, T, seed=3, sequential=sequential)
    two = [data.PretrainLoader(str(d), "train", B, T, rank=r, world_size=2, seed=3, sequential=sequential)
           for r in range(2)]
    accum = data.PretrainLoader(str(d), "train", B, T, seed=3, sequential=sequential)
    seen = []
    for step in range(4):  # 4 steps x 6 windows = 2 epochs of 12 windows
        x, y = one.next_batch()
        assert x.shape == (2 * B, T) and np.array_equal(x[:, 1:], y[:, :-1])
        parts = [ld.next_batch() for ld in two]
        micro = [accum.next_batch() for _ in range(2)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x)  # 2 ranks x accum 1 == 1 rank x accum 2
        assert np.array_equal(np.concatenate([m[0] for m in micro]), x)
        assert not set(map(tuple, parts[0][0].tolist())) & set(map(tuple, parts[1][0].tolist()))
        seen += [(xi.tolist(), yi.tolist()) for xi, yi in zip(x, y)]
    for epoch in (seen[:12], seen[12:]):
        xs = sorted(epoch)
        # the shards hold consecutive numbers, so windows are recognised by their first token
        starts = sorted(x[0] for x, _ in xs)
        expect = sorted([s * T for s in range(5)] + [5 * T + 1 + s * T for s in range(7)])
        assert starts == expect
        for x, yy in xs:
            assert x == list(range(x[0], x[0] + T)) and yy == list(range(x[0] + 1, x[0] + T + 1))
        covered = sorted([t for x, _ in xs for t in x] + [5 * T, 12 * T + 1])  # + the last target of each shard
        assert covered == sorted(tokens.tolist())
    if sequential:
        assert [x[0] for x, _ in seen[:12]] == expect
    else:
        assert [x[0] for x, _ in seen[:12]] != [x[0] for x, _ in seen[12:]]  # a fresh order each epoch


def test_reader_state_dict_resume_and_mixture(tmp_path):
    a = make_dir(tmp_path / "a", [4000], vocab=30000)
    b = make_dir(tmp_path / "b", [3000, 2000], vocab=30000, offset=10000)
    spec = f"{a}:0.7,{b}:0.3"
    ld = data.PretrainLoader(spec, "train", 4, 16, seed=7)
    for _ in range(5):
        ld.next_batch()
    state = json.loads(json.dumps(ld.state_dict()))
    cont = [ld.next_batch() for _ in range(20)]
    resumed = data.PretrainLoader(spec, "train", 4, 16, seed=7)
    resumed.load_state_dict(state)
    for x, y in cont:
        x2, y2 = resumed.next_batch()
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # deterministic, and close to the weights: source a has tokens < 10000, b has tokens >= 10000
    first = [data.PretrainLoader(spec, "train", 50, 16, seed=7).next_batch()[0] for _ in range(2)]
    assert np.array_equal(first[0], first[1])
    xs = np.concatenate([ld.next_batch()[0] for _ in range(100)])
    share_a = np.mean(xs[:, 0] < 10000)
    assert 0.62 < share_a < 0.78
    assert sum(resumed.state_dict()["counts"]) == resumed.state_dict()["pos"]
    with pytest.raises(ValueError, match="block_size"):
        data.PretrainLoader(spec, "train", 4, 32, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with seed 7"):   # another seed would silently reorder the data
        data.PretrainLoader(spec, "train", 4, 16, seed=8).load_state_dict(state)
    with pytest.raises(FileNotFoundError, match="no val_"):
        data.PretrainLoader(str(a), "val", 4, 16)
    with pytest.raises(ValueError, match="vocab_size 30000 but the model has 512"):
        data.PretrainLoader(str(a), "train", 4, 16, vocab_size=512)
    # the same vocab size from another tokenizer: the ids mean other things, so mixing them is refused
    c = make_dir(tmp_path / "c", [3000], vocab=30000, tok_hash="f" * 64)
    with pytest.raises(ValueError, match="different tokenizers"):
        data.PretrainLoader(f"{a}:0.5,{c}:0.5", "train", 4, 16)


# ---------------------------------------------------------------------------------------------------------
# MMLU


def write_mmlu(folder, rows_by_subject, split="test"):
    (folder / split).mkdir(parents=True, exist_ok=True)
    for subject, rows in rows_by_subject.items():
        with open(folder / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\r\n").writerows(rows)


LONG_Q = ("Which of the following best describes the reason that the migrating geese of the northern lakes fly "
          "in a wide V formation every autumn?")


def test_load_mmlu_folder_and_errors(tmp_path):
    rows = {"geese": [[LONG_Q, "Wind", "Sun, and moon", "Food", "Heat", "A"], ["2+2?", "3", "4", "5", "6", "B"]],
            "algebra": [["Find x: x, y", "1", "2", "3", "4", "D"]]}
    write_mmlu(tmp_path, rows)
    got = data.load_mmlu(tmp_path, "test")
    assert list(got) == ["algebra", "geese"]
    assert got["geese"][0] == {"question": LONG_Q, "choices": ["Wind", "Sun, and moon", "Food", "Heat"],
                               "answer": "A"}
    assert data.load_mmlu(tmp_path, "test", ["geese"]) == {"geese": got["geese"]}
    with pytest.raises(ValueError, match="available: algebra, geese"):
        data.load_mmlu(tmp_path, "test", ["anatomy"])
    with pytest.raises(FileNotFoundError, match="data.py --mmlu"):
        data.load_mmlu(tmp_path, "dev")
    (tmp_path / "test" / "bad_test.csv").write_text('q,a,b,c,D\n"q2",a,b,c,d,E\n')
    with pytest.raises(ValueError, match=r"bad_test.csv line 1: expected 6 fields"):
        data.load_mmlu(tmp_path, "test")
    (tmp_path / "test" / "bad_test.csv").write_text('q,a,b,c,d,D\n"q2",a,b,c,d,E\n')
    with pytest.raises(ValueError, match=r"bad_test.csv line 2: answer 'E'"):
        data.load_mmlu(tmp_path, "test")


def test_load_mmlu_real_folder_matches_counts(shared_data):
    folder = shared_data / "mmlu"
    expect = {}
    for row in list(csv.reader(open(folder / "COUNTS.tsv"), delimiter="\t"))[1:]:
        expect[row[0]] = dict(zip(["dev", "val", "test"], map(int, row[1:])))
    total = expect.pop("TOTAL")
    assert total == {"dev": 285, "val": 1531, "test": 14042}  # the published sizes
    for split in ["dev", "val", "test"]:
        got = data.load_mmlu(folder, split)
        assert {s: len(v) for s, v in got.items()} == {s: c[split] for s, c in expect.items()}


def test_load_mmlu_hub_layout_from_the_offline_cache(tmp_path):
    """cais/mmlu's parquet schema (integer answer, choices list), read from a Hugging Face cache without network."""
    rows = [{"question": LONG_Q, "subject": "geese", "choices": ["a", "b", "c", "d"], "answer": 2},
            {"question": "1+1?", "subject": "algebra", "choices": ["1", "2", "3", "4"], "answer": 1}]
    repo = tmp_path / "hf" / "hub" / "datasets--cais--mmlu"
    snap = repo / "snapshots" / ("0" * 40) / "all"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    pq.write_table(pa.Table.from_pylist(rows), snap / "test-00000-of-00001.parquet")
    code = "import json, data; print(json.dumps(data.load_mmlu('hub', 'test')))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "algebra": [{"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": "B"}],
        "geese": [{"question": LONG_Q, "choices": ["a", "b", "c", "d"], "answer": "C"}]}


# ---------------------------------------------------------------------------------------------------------
# SFT


def test_load_sft_formats_and_malformed_counted(tok, tmp_path):
    good = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"conversations": [{"from": "human", "value": "Name a river"}, {"from": "gpt", "value": "The Rhine."}]},
        {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"},
        {"question": "What is 6 times 7?", "answer": "6*7 = <<6*7=42>>42\n#### 42"},
        {"instruction": "Capitalise it", "instances": [{"input": "paris", "output": "Paris"}], "id": "t1"},
    ]
    expect = [good[0]["messages"],
              [{"role": "user", "content": "Name a river"}, {"role": "assistant", "content": "The Rhine."}],
              [{"role": "user", "content": "Add the numbers\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
              [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
              [{"role": "user", "content": good[4]["question"]}, {"role": "assistant", "content": good[4]["answer"]}],
              [{"role": "user", "content": "Capitalise it\n\nparis"}, {"role": "assistant", "content": "Paris"}]]
    bad = ['{"messages": [{"role": "wizard", "content": "x"}]}', '{"messages": "hello"}', '[1, 2]',
           '{"text": "no chat here"}', '{"messages": [{"role": "user", "content": "only a question"}]}',
           '{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
           '{"instruction": "Write", "output": 5}', '{"messages": [{"role": "user", "content": "'
           + "long " * 300 + '"}, {"role": "assistant", "content": "ok"}]}', "{not json"]
    (tmp_path / "chat.jsonl").write_text("\n".join([json.dumps(g) for g in good[:4]] + bad) + "\n")
    pq.write_table(pa.Table.from_pylist(good[4:5]), tmp_path / "gsm.parquet")
    (tmp_path / "si.jsonl").write_text(json.dumps(good[5]) + "\n")
    convs, counts = data.load_sft([str(tmp_path / "chat.jsonl"), f"{tmp_path / 'gsm.parquet'}:2",
                                   f"{tmp_path / 'si.jsonl'}:0.5"], tok, max_len=200)
    assert counts == {"records": 15, "kept": 6, "bad_messages": 4, "not_an_object": 1, "unknown_format": 1,
                      "no_assistant": 1, "too_long": 1, "bad_json": 1}
    want = [tok.render_chat(m) for m in expect[:5]] + [tok.render_chat(expect[4])]  # gsm weight 2; si 0.5 -> 0
    assert convs == want
    with pytest.raises(ValueError, match="no usable SFT records"):
        (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n")
        data.load_sft([str(tmp_path / "bad.jsonl")], tok, max_len=200)


def test_sft_decontamination_and_packing_loader(tok, tok_dir, tmp_path):
    write_mmlu(tmp_path / "mmlu", {"geese": [[LONG_Q, "Wind", "Sun", "Food", "Heat", "A"]]})
    rng = random.Random(0)

    def say(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    chats = [{"messages": [{"role": "user", "content": say(3, 30)}, {"role": "assistant", "content": say(1, 30)}]}
             for _ in range(60)]
    leak = {"messages": [{"role": "user", "content": "Quiz: " + LONG_Q.upper() + " Think."},
                         {"role": "assistant", "content": "Wind."}]}
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats + [leak]))
    meta = data.prepare_sft([str(tmp_path / "chat.jsonl")], tok_dir, tmp_path / "sft", max_len=120,
                            val_fraction=0.1, mmlu_dir=tmp_path / "mmlu")
    assert meta["counts"]["contaminated"] == meta["decontamination"]["removed"] == 1
    assert meta["train_conversations"] + meta["val_conversations"] == 60 and meta["val_conversations"] > 0
    kept = data.prepare_sft([str(tmp_path / "chat.jsonl")], tok_dir, tmp_path / "sft2", max_len=1000,
                            mmlu_dir=tmp_path / "mmlu", decontaminate=False)
    assert kept["train_conversations"] + kept["val_conversations"] == 61
    assert bpe.Tokenizer.load(tmp_path / "sft").hash == tok.hash

    rendered = {tuple(tok.render_chat(c["messages"])[0]): tok.render_chat(c["messages"])[1] for c in chats}
    T, B = 128, 2  # max_len 120: every conversation fits a row
    ld = data.SFTLoader(tmp_path / "sft", "train", 2 * B, T, seed=1)
    assert ld.too_long == 0
    offsets = np.load(tmp_path / "sft" / "train_offsets.npy")
    short = data.SFTLoader(tmp_path / "sft", "train", 2, 40, seed=1)  # conversations over 41 tokens cannot fit a row
    assert short.too_long == int(np.sum(np.diff(offsets) > 41)) > 0
    ranks = [data.SFTLoader(tmp_path / "sft", "train", B, T, rank=r, world_size=2, seed=1) for r in range(2)]
    rows = []
    while len(rows) < len(ld.rows):
        x, y, doc = ld.next_batch()
        assert x.shape == y.shape == doc.shape == (2 * B, T)
        parts = [r.next_batch() for r in ranks]  # 2 ranks x 1 == 1 rank with the global counter
        for k in range(3):
            assert np.array_equal(np.concatenate([p[k] for p in parts]), (x, y, doc)[k])
        rows += list(zip(x.numpy(), y.numpy(), doc.numpy()))
    found = []
    for xi, yi, di in rows[:len(ld.rows)]:  # one epoch
        assert di[0] == 0 and np.all(np.diff(di) >= 0)  # doc ids restart per row and count up
        for d in np.unique(di):
            pos = np.flatnonzero(di == d)
            seg = list(xi[pos])
            if not any(seg):  # padding (token 0), nothing to learn; a conversation has role tokens
                assert np.all(yi[pos] == -1)
                continue
            # a conversation that fills the row to the end has its last token only in y
            key = next(k for k in rendered if list(k[:len(seg)]) == seg and len(k) - len(seg) in (0, 1))
            mask = rendered[key]
            want = [key[t + 1] if t + 1 < len(key) and mask[t + 1] else -1 for t in range(len(seg))]
            assert list(yi[pos]) == want
            found.append(key)
    assert len(found) == len(set(found)) == meta["train_conversations"]  # each exactly once per epoch
    state = json.loads(json.dumps(ld.state_dict()))
    nxt = ld.next_batch()
    again = data.SFTLoader(tmp_path / "sft", "train", 2 * B, T, seed=1)
    again.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(nxt, again.next_batch()))
