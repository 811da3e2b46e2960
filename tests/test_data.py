"""data.py: pretraining prep (formats, cleaning, dedup, val split, resume after SIGKILL, errors),
its command line, and that preparation never imports torch."""
import gzip
import json
import os
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
from conftest import make_docs, skip_or_fail_on_ci
import data
import shards

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["d.parquet", "d.arrow", "d.jsonl.gz", "d.jsonl.zst", "txt", "all.txt"]


def split_docs(tokens, bos):
    """Token stream -> list of documents (token lists), each of which started with bos."""
    starts = list(np.flatnonzero(np.asarray(tokens) == bos)) + [len(tokens)]
    assert starts[0] == 0
    return [list(tokens[a + 1:b]) for a, b in zip(starts, starts[1:])]


def bins(folder):
    return {f.name: f.read_bytes() for f in sorted(Path(folder).glob("*.bin"))}


def decoded(tok, path):
    return [tok.decode(ids) for ids in split_docs(shards.read_shard(path), tok.bos_id)]


# ---------------------------------------------------------------------------------------------
# Formats, content, val split


def write_formats(folder, docs):
    """The same documents as parquet, arrow (IPC stream, as the datasets cache), jsonl.gz,
    jsonl.zst, one txt per document, and one txt with a separator."""
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


@pytest.fixture(scope="module")
def preps(tok_dir, tmp_path_factory):
    """(documents, {format: prepared dir}): 60 documents in every format, prepared alike."""
    root = tmp_path_factory.mktemp("formats")
    docs = make_docs(60)
    write_formats(root / "in", docs)
    outs = {}
    for name in FORMATS:
        outs[name] = root / name.replace(".", "_")
        sep = "<|sep|>" if name == "all.txt" else None
        data.prepare([str(root / "in" / name)], tok_dir, outs[name], val_fraction=0.2, workers=1,
                     txt_separator=sep, shard_mb=0.002)
    return docs, outs


@pytest.mark.parametrize("name", FORMATS[1:])
def test_every_format_gives_the_parquet_shards(preps, name):
    _, outs = preps
    reference = bins(outs["d.parquet"])
    assert len([n for n in reference if n.startswith("train")]) > 1
    assert any(n.startswith("val") for n in reference)
    assert bins(outs[name]) == reference


def test_shards_decode_to_the_input_documents(preps, tok):
    docs, outs = preps
    got = [text for f in sorted(outs["d.parquet"].glob("*.bin")) for text in decoded(tok, f)]
    assert sorted(got) == sorted(docs)


def test_meta_counts_the_shards(preps, tok):
    out = preps[1]["d.parquet"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(shards.read_shard(f))
                                                            for f in out.glob("*.bin"))
    assert meta["val_tokens"] == sum(len(shards.read_shard(f)) for f in out.glob("val_*.bin")) > 0
    assert meta["tokenizer_hash"] == tok.hash == bpe.Tokenizer.load(out).hash


def test_val_split_is_per_document_not_by_position(preps, tok, tok_dir, tmp_path):
    """The same documents in another order (and in one big shard) land in the same split."""
    docs, outs = preps
    val_before = [t for f in sorted(outs["d.parquet"].glob("val_*.bin")) for t in decoded(tok, f)]
    parquet = outs["d.parquet"].parent / "in" / "d.parquet"
    data.prepare([str(parquet)], tok_dir, tmp_path / "again", val_fraction=0.2, workers=1)
    rev = tmp_path / "rev.jsonl"
    rev.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    data.prepare([str(rev)], tok_dir, tmp_path / "rev", val_fraction=0.2, workers=1)
    val = decoded(tok, tmp_path / "again" / "val_000000.bin")
    val_rev = decoded(tok, tmp_path / "rev" / "val_000000.bin")
    assert sorted(val) == sorted(val_rev) == sorted(val_before)


# ---------------------------------------------------------------------------------------------
# Cleaning


@pytest.fixture
def messy(tok_dir, tmp_path):
    """A prep of BOM/CRLF, duplicate, blank, tiny and invalid-UTF-8 documents; (docs, meta)."""
    docs = make_docs(5, seed=3)
    (tmp_path / "in").mkdir()
    rows = ["\ufeff" + docs[0].replace(" ", "\r\n", 3), docs[1], docs[1], "   \n ", "tiny", docs[2],
            docs[0]]
    pq.write_table(pa.table({"text": rows}), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "bad.txt").write_bytes(docs[3].encode() + b" \xff\xfe broken " + b"\xc3")
    meta = data.prepare([str(tmp_path / "in")], tok_dir, tmp_path / "out", val_fraction=0,
                        workers=1)
    return docs, meta, tmp_path / "out"


def test_cleaning_counts(messy):
    c = messy[1]["docs"]
    # docs[0] with CRLF and BOM cleans to docs[0] with \n, which is not a duplicate of docs[0]
    counts = (c["docs_read"], c["docs_kept"], c["dropped_empty"], c["dropped_duplicate"],
              c["utf8_replaced"])
    assert counts == (8, 5, 2, 1, 1)


def test_cleaned_documents_in_order_with_invalid_utf8_replaced(messy, tok):
    docs, _, out = messy
    assert decoded(tok, out / "train_000000.bin") == [
        docs[0].replace(" ", "\n", 3), docs[1], docs[2], docs[0],
        docs[3] + " \ufffd\ufffd broken \ufffd"]


@pytest.mark.parametrize("name", ["11-0.txt", "3261.txt"])  # "*** START OF" and "***START OF"
def test_gutenberg_header_and_footer_stripped(shared_data, name):
    path = shared_data / "gutenberg" / name
    if not path.exists():
        skip_or_fail_on_ci(f"no {path}")
    raw = path.read_bytes().decode("utf-8")
    lines = raw.lstrip("\ufeff").split("\r\n")
    squeezed = [line.replace(" ", "") for line in lines]
    start = next(i for i, line in enumerate(squeezed) if line.startswith("***STARTOF"))
    end = next(i for i, line in enumerate(squeezed) if line.startswith("***ENDOF"))
    body = lines[start + 1:end]
    closing = [i for i, line in enumerate(body)
               if line.startswith("End of") and "Project Gutenberg" in line]
    text, stripped = data.clean(raw)
    assert stripped and text == "\n".join(body[:closing[-1]] if closing else body).strip()
    assert "Gutenberg" not in text[-5000:] and "\r" not in text and "\ufeff" not in text
    # the licence (~18 kB) and header went, the book stayed
    assert 0.8 * len(raw) < len(text) < len(raw) - 15000


# ---------------------------------------------------------------------------------------------
# Errors: one clear message, nothing half-written


def test_missing_text_field_refused(tok_dir, tmp_path):
    pq.write_table(pa.table({"content": make_docs(3)}), tmp_path / "nofield.parquet")
    with pytest.raises(ValueError, match="has no field 'text'"):
        data.prepare([str(tmp_path / "nofield.parquet")], tok_dir, tmp_path / "o", workers=1)
    assert not list((tmp_path / "o").glob("**/*.bin"))


def test_empty_folder_refused(tok_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="matches no"):
        data.prepare([str(tmp_path / "empty")], tok_dir, tmp_path / "o", workers=1)
    assert not list((tmp_path / "o").glob("**/*.bin"))


def test_blank_input_refused(tok_dir, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n  ")
    with pytest.raises(ValueError, match="no documents left"):
        data.prepare([str(tmp_path / "blank.txt")], tok_dir, tmp_path / "o", workers=1)
    assert not list((tmp_path / "o").glob("**/*.bin"))


def test_tokenizer_over_uint16_refused_before_anything_is_written(tmp_path):
    import tokenizers
    vocab = {f"w{i}": i for i in range(70000)}
    big = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    (tmp_path / "blank.txt").write_text("  \n\n  ")
    with pytest.raises(ValueError, match="65536"):
        data.prepare([str(tmp_path / "blank.txt")], bpe.Tokenizer(big.to_str().encode()),
                     tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_weights_on_pretraining_presets_refused_before_download(tok_dir, tmp_path):
    # they would be dropped silently
    with pytest.raises(ValueError, match="weights on --source are for SFT"):
        data.main(["--source", "fineweb-edu:0.7", "--tokenizer", str(tok_dir),
                   "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_command_line_error_is_one_line(tok_dir, tmp_path):
    pq.write_table(pa.table({"content": make_docs(3)}), tmp_path / "nofield.parquet")
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "--input",
                        str(tmp_path / "nofield.parquet"), "--tokenizer", str(tok_dir),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not list((tmp_path / "o").glob("**/*.bin"))


def test_offline_preset_is_one_clear_line(tok_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "--source", "fineweb-edu",
                        "--max_shards", "1", "--tokenizer", str(tok_dir), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "HuggingFaceFW/fineweb-edu" in r.stderr and "hf download" in r.stderr
    assert "--input" in r.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Resume, the command line, no torch


# 0.25: the hash split lands; 0.0005: it gives nothing, and the last documents are held out
@pytest.mark.parametrize("val_fraction, tail", [("0.25", False), ("0.0005", True)])
def test_sigkill_then_rerun_is_byte_identical(tok_dir, tmp_path, val_fraction, tail):
    docs = make_docs(40, seed=5)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    args = dict(val_fraction=float(val_fraction), shard_mb=1e-6)  # one document per shard
    meta = data.prepare([str(tmp_path / "in.jsonl")], tok_dir, tmp_path / "ref", workers=1, **args)
    assert (meta["docs"]["val_tail_bytes"] > 0) == tail
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "data.py"), "--input", str(tmp_path / "in.jsonl"),
           "--tokenizer", str(tok_dir), "--out", str(out), "--workers", "2", "--val_fraction",
           val_fraction, "--shard_mb", "1e-6"]
    proc = subprocess.Popen(cmd, env={**os.environ, "KILN_PREP_SLEEP": "0.3"},
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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


def test_another_prep_into_the_same_folder_refused(tok_dir, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                               for d in make_docs(10)))
    data.prepare([str(tmp_path / "in.jsonl")], tok_dir, tmp_path / "o", workers=1, shard_mb=1e-6)
    before = bins(tmp_path / "o")
    with pytest.raises(ValueError, match="other inputs or settings"):
        data.prepare([str(tmp_path / "in.jsonl")], tok_dir, tmp_path / "o", workers=1,
                     val_fraction=0.5, shard_mb=1e-6)
    (tmp_path / "o" / ".prep_state.json").unlink()
    with pytest.raises(ValueError, match="already holds shards from another prep"):
        data.prepare([str(tmp_path / "in.jsonl")], tok_dir, tmp_path / "o", workers=1)
    assert bins(tmp_path / "o") == before


def test_command_line_writes_what_prepare_writes(tok_dir, tmp_path):
    docs = make_docs(30, seed=7)
    (tmp_path / "in.txt").write_text("\n\n".join(docs), encoding="utf-8")
    data.prepare([str(tmp_path / "in.txt")], tok_dir, tmp_path / "api", val_fraction=0.2,
                 workers=1, txt_separator="\n\n", shard_mb=0.001)
    data.main(["--input", str(tmp_path / "in.txt"), "--tokenizer", str(tok_dir),
               f"--out={tmp_path / 'cli'}", "--val_fraction=0.2", "--workers", "1",
               "--txt_separator", "\\n\\n", "--shard_mb", "0.001"])
    assert len(bins(tmp_path / "api")) > 2 and bins(tmp_path / "cli") == bins(tmp_path / "api")


def test_preparation_never_imports_torch(tok_dir, tmp_path):
    """Preparation (pretraining, SFT, MMLU, tokenizer) runs on machines without torch."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                               for d in make_docs(20)))
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    code = f"""
import sys
import bpe, data, mmlu, readers, sft_data, shards
tmp = {str(tmp_path)!r}
tok = bpe.train([tmp + "/in.jsonl"], 300, tmp + "/tok")
data.prepare([tmp + "/in.jsonl"], tmp + "/tok", tmp + "/pre", workers=1)
data.prepare([tmp + "/in.jsonl"], tmp + "/tok", tmp + "/pre2", workers=2)
sft_data.prepare_sft([tmp + "/chat.jsonl"], tmp + "/tok", tmp + "/sft", decontaminate=False)
shards.read_shard(tmp + "/pre/train_000000.bin")
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
