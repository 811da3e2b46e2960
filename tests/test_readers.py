"""readers.py: every file format yields the same texts; file finding; records; weights; errors."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import readers

DOCS = ["first doc\nwith lines\r\n", "ünïcödé 🙂 日本", "", "x" * 3000, '{"json": "inside"}\n\n']
KINDS = ("jsonl", "jsonl.gz", "jsonl.zst", "json.gz", "parquet", "arrow", "ipc.arrow")


def write_all_formats(folder):
    """The same documents in every supported format; returns {name: path}."""
    folder.mkdir()
    rows = "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS))
    paths = {f: folder / f"docs.{f}" for f in KINDS}
    paths["jsonl"].write_text(rows, encoding="utf-8")
    for name in ("jsonl.gz", "json.gz"):  # .json.gz: JSON lines named the way C4 names them
        with gzip.open(paths[name], "wt", encoding="utf-8") as f:
            f.write(rows)
    with pa.CompressedOutputStream(str(paths["jsonl.zst"]), "zstd") as f:
        f.write(rows.encode())
    table = pa.table({"id": list(range(len(DOCS))), "body": DOCS})
    pq.write_table(table, paths["parquet"], row_group_size=2)  # several row groups
    # an IPC stream, as Hugging Face datasets caches
    with pa.ipc.new_stream(str(paths["arrow"]), table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):
            w.write_batch(batch)
    with pa.ipc.new_file(str(paths["ipc.arrow"]), table.schema) as w:
        w.write_table(table)
    for i, d in enumerate(DOCS):
        (folder / "txt").mkdir(exist_ok=True)
        (folder / "txt" / f"{i:02d}.txt").write_bytes(d.encode())
    return paths


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_yields_the_same_texts(tmp_path, kind):
    path = write_all_formats(tmp_path / "docs")[kind]
    assert list(readers.iter_texts([path], text_field="body")) == DOCS


def test_txt_files_of_a_folder_yield_the_same_texts(tmp_path):
    write_all_formats(tmp_path / "docs")
    txts = readers.find_files([str(tmp_path / "docs" / "txt")])
    assert list(readers.iter_texts(txts)) == DOCS


def test_find_files_globs_and_folders(tmp_path):
    paths = write_all_formats(tmp_path / "docs")
    found = readers.find_files([str(tmp_path / "docs" / "*.jsonl*")])
    assert found == [paths[k] for k in ("jsonl", "jsonl.gz", "jsonl.zst")]
    # a folder is searched recursively, sorted, keeping only the known suffixes
    assert len(readers.find_files([str(tmp_path / "docs")])) == len(paths) + len(DOCS)


def test_invalid_utf8_in_txt_is_replaced(tmp_path):
    # U+FFFD (as in data.py's shards), not a crash
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok")
    assert list(readers.iter_texts([tmp_path / "bad.txt"])) == ["caf\ufffd ok"]


def test_max_chars_cuts_at_exactly_that_many(tmp_path):
    paths = write_all_formats(tmp_path / "docs")
    got = "".join(readers.iter_texts([paths["parquet"]], "body", max_chars=40))
    assert got == "".join(DOCS)[:40]


@pytest.mark.parametrize("name", ["jsonl", "jsonl.zst", "parquet", "arrow", "ipc.arrow"])
def test_missing_text_field_names_file_and_fields(tmp_path, name):
    path = write_all_formats(tmp_path / "docs")[name]
    with pytest.raises(ValueError, match=rf"{path.name}.* no field 'text' .*'body'.*--text_field"):
        list(readers.iter_texts([path]))


def test_missing_input_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        readers.find_files([str(tmp_path / "nothing_here*.txt")])


def test_unknown_suffix_refused(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="unknown file type"):
        list(readers.iter_texts(readers.find_files([str(tmp_path / "a.csv")])))


def test_records_of_jsonl_json_list_and_parquet(tmp_path):
    records = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{bad\n")
    (tmp_path / "r.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    assert list(readers.iter_records(tmp_path / "r.jsonl")) == records + [None]  # bad line: None
    assert list(readers.iter_records(tmp_path / "r.json")) == records
    assert list(readers.iter_records(tmp_path / "r.parquet")) == records


def test_parse_weighted():
    assert readers.parse_weighted("a:0.7,b:0.3") == [("a", 0.7), ("b", 0.3)]
    assert readers.parse_weighted(["c:/x/y:2", "d", "e:f"]) == [("c:/x/y", 2.0), ("d", 1.0),
                                                               ("e:f", 1.0)]
    with pytest.raises(ValueError, match="must be positive"):
        readers.parse_weighted("a:0")
