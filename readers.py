"""Reading text and records from local files: txt, JSON lines (.jsonl, .json, .gz, .zst), parquet
and arrow; and fetching dataset files from the Hugging Face hub.

    files = find_files(["data/raw/", "extra/*.parquet"])  # folders, files or globs -> paths
    files = hub_files("c4", "allenai/c4", ["en/c4-train.*.json.gz"], max_files=2)  # -> paths
    for text in iter_texts(files, "text"): ...            # documents, streamed
    for record in iter_records(path): ...                 # dicts (SFT data); None: a bad JSON line

Bottom floor: bpe.py, data.py, sft_data.py and mmlu.py read through here. pyarrow does the
decompression, huggingface_hub the downloads.
"""
import fnmatch
import glob
import io
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

# .json and .json.gz are JSON lines too: C4 ships its shards as .json.gz.
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz")


SUFFIXES = (".txt", *JSONL_SUFFIXES, ".parquet", ".arrow")


def find_files(inputs):
    """Expand files, folders (recursive, sorted, known suffixes only) and globs into a list of
    paths."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
        elif p.is_file():
            found = [p]
        else:  # a glob, relative or absolute
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if os.path.isfile(f))
        if not found:
            raise FileNotFoundError(f"input {item!r} matches no {'/'.join(SUFFIXES)} file: "
                                    "check the path")
        files += [f for f in found if f not in files]
    return files


def _missing_field(path, field, names):
    return ValueError(f"{path} has no field {field!r} (it has {sorted(names)}): "
                      "pass --text_field NAME")


def _read_txt(path, chunk_chars):
    # newline="" keeps \r\n as it is: the tokenizer must see the exact text. Invalid UTF-8 becomes
    # U+FFFD, as in data.py's shards, instead of a crash that names no file.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if not chunk_chars:
            yield f.read()  # a whole file is one document
            return
        # Stream for training: cut only after a newline that is followed by a non-space, where the
        # split pattern always ends a piece anyway, so the chunks pre-tokenize exactly like the
        # whole file.
        carry = ""
        while block := f.read(chunk_chars):
            carry += block
            cut = carry.rfind("\n", 0, len(carry) - 1)
            while cut >= 0 and carry[cut + 1].isspace():
                cut = carry.rfind("\n", 0, cut)
            # a huge line: cut anyway to keep memory bounded
            if cut < 0 and len(carry) > 8 * chunk_chars:
                cut = len(carry) - 1
            if cut >= 0:
                yield carry[:cut + 1]
                carry = carry[cut + 1:]
        if carry:
            yield carry


def _jsonl_rows(path):
    """(line number, record or None) for each non-blank line of a JSON-lines file (.gz and .zst
    decompressed by pyarrow, detected from the suffix); None where a line is not JSON."""
    import pyarrow as pa
    with pa.input_stream(str(path), compression="detect") as raw:
        for n, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", newline="\n"), 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError:
                    yield n, None


def _read_jsonl(path, field):
    for n, row in _jsonl_rows(path):
        if row is None:
            raise ValueError(f"{path} line {n} is not valid JSON: fix or remove that line")
        if not isinstance(row, dict) or field not in row:
            raise _missing_field(f"{path} line {n}", field, row if isinstance(row, dict) else [])
        if row[field] is not None:
            yield row[field]


def _read_arrow_batches(path, field, batches, schema):
    if field not in schema.names:
        raise _missing_field(path, field, schema.names)
    for batch in batches:
        yield from (t for t in batch.column(field).to_pylist() if t is not None)


def _read_table(path, field):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.name.endswith(".parquet"):
        pf = pq.ParquetFile(path)  # one row group at a time: memory stays flat
        cols = [field] if field in pf.schema_arrow.names else None
        batches = pf.iter_batches(batch_size=1024, columns=cols)
        yield from _read_arrow_batches(path, field, batches, pf.schema_arrow)
        return
    with pa.memory_map(str(path)) as src:
        try:  # Hugging Face datasets cache files are Arrow IPC *stream* files
            reader = pa.ipc.open_stream(src)
            yield from _read_arrow_batches(path, field, reader, reader.schema)
        except pa.ArrowInvalid:
            src.seek(0)
            reader = pa.ipc.open_file(src)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            yield from _read_arrow_batches(path, field, batches, reader.schema)


def iter_texts(paths, text_field="text", max_chars=None, chunk_chars=None):
    """Yield documents (str) from files, streaming; stop after max_chars characters in total.
    chunk_chars: cut .txt files into pieces of about this size (training does not need whole
    documents)."""
    left = float("inf") if max_chars is None else max_chars
    for path in map(Path, paths):
        if path.name.endswith(".txt"):
            texts = _read_txt(path, chunk_chars)
        elif path.name.endswith(JSONL_SUFFIXES):
            texts = _read_jsonl(path, text_field)
        elif path.name.endswith((".parquet", ".arrow")):
            texts = _read_table(path, text_field)
        else:
            raise ValueError(f"{path}: unknown file type, use one of {', '.join(SUFFIXES)}")
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"{path}: field {text_field!r} holds {type(text).__name__}, "
                                 "not text")
            if len(text) >= left:
                yield text[:left]
                return
            left -= len(text)
            yield text


def parse_weighted(spec):
    """'a:0.7,b:0.3' or ['a:2', 'b'] -> [(name, weight)]; a suffix counts as a weight only if it is
    a number."""
    out = []
    for item in map(str, spec.split(",") if isinstance(spec, str) else spec):
        name, _, w = item.rpartition(":")
        try:
            out.append((name, float(w)) if name else (item, 1.0))
        except ValueError:
            out.append((item, 1.0))
    if any(w <= 0 for _, w in out):
        raise ValueError(f"weights in {spec!r} must be positive")
    return out


def iter_records(path):
    """The records of a JSON-lines, JSON-list (.json starting with '[', as alpaca_data.json) or
    parquet file; a JSON line that does not parse yields None, so the caller can count it."""
    path = Path(path)
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    if path.name.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            yield from json.loads(path.read_text(encoding="utf-8"))
            return
    yield from (row for _, row in _jsonl_rows(path))


def _hub_download(repo, patterns, max_files):
    """Download (resumably, with progress bars) the dataset files matching patterns."""
    import huggingface_hub as hf
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("HF_HUB_OFFLINE is set")
    host = urlparse(constants.ENDPOINT)
    # fail in 5 s when there is no route: the hub client retries for ~30 s
    socket.create_connection((host.hostname, host.port or 443), timeout=5).close()
    names = sorted(f for f in hf.HfApi().list_repo_files(repo, repo_type="dataset")
                   if any(fnmatch.fnmatch(f, p) for p in patterns))[:max_files]
    return [Path(hf.hf_hub_download(repo, f, repo_type="dataset")) for f in names]


def _hub_cached(repo, patterns, max_files):
    """The dataset files matching patterns in the local Hugging Face cache ([] when none)."""
    import huggingface_hub as hf
    try:
        root = Path(hf.snapshot_download(repo, repo_type="dataset", allow_patterns=patterns,
                                         local_files_only=True))
        files = [f for f in root.rglob("*") if f.is_file()]
        return sorted(f for f in files if any(fnmatch.fnmatch(f.relative_to(root).as_posix(), p)
                                              for p in patterns))[:max_files]
    except Exception:
        return []


def hub_files(preset, repo, patterns, max_files=None, fix=None):
    """The files of a Hugging Face dataset repo that match patterns: downloaded, or without network
    from the local cache; when neither works, one error line saying what to fetch (or `fix`)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")  # read at import: fail fast when slow
    try:
        return _hub_download(repo, patterns, max_files)
    except Exception as e:  # offline, no route, timeout, hub error: try the cache before giving up
        err = f"{type(e).__name__}: {e}".split("\n")[0][:120]
    files = _hub_cached(repo, patterns, max_files)
    if not files:
        fix = fix or (f"on a machine with network run `hf download {repo} --repo-type dataset "
                      f"--include '{patterns[0]}' --local-dir DIR`, copy DIR here and pass "
                      "--input DIR")
        raise ValueError(f"preset {preset}: {repo} files {' '.join(patterns)} are not in the "
                         f"Hugging Face cache and the hub cannot be reached ({err}); {fix}")
    return files
