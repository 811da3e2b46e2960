"""mmlu.py: the original CSV layout, its row checks, the real folder's published sizes, the hub's
parquet layout read from an offline cache."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mmlu

ROOT = Path(__file__).resolve().parents[1]
LONG_Q = ("Which of the following best describes the reason that the migrating geese of the "
          "northern lakes fly in a wide V formation every autumn?")
ROWS = {"geese": [[LONG_Q, "Wind", "Sun, and moon", "Food", "Heat", "A"],
                  ["2+2?", "3", "4", "5", "6", "B"]],
        "algebra": [["Find x: x, y", "1", "2", "3", "4", "D"]]}


def write_mmlu(folder, rows_by_subject, split="test"):
    (folder / split).mkdir(parents=True, exist_ok=True)
    for subject, rows in rows_by_subject.items():
        path = folder / split / f"{subject}_{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\r\n").writerows(rows)


def test_folder_is_read_by_subject(tmp_path):
    write_mmlu(tmp_path, ROWS)
    got = mmlu.load_mmlu(tmp_path, "test")
    assert list(got) == ["algebra", "geese"]
    assert got["geese"][0] == {"question": LONG_Q, "answer": "A",
                               "choices": ["Wind", "Sun, and moon", "Food", "Heat"]}
    assert len(got["geese"]) == 2 and got["algebra"][0]["answer"] == "D"


def test_subjects_filter(tmp_path):
    write_mmlu(tmp_path, ROWS)
    got = mmlu.load_mmlu(tmp_path, "test")
    assert mmlu.load_mmlu(tmp_path, "test", ["geese"]) == {"geese": got["geese"]}
    assert mmlu.load_mmlu(tmp_path, "test", "geese,algebra") == got
    with pytest.raises(ValueError, match="available: algebra, geese"):
        mmlu.load_mmlu(tmp_path, "test", ["anatomy"])


def test_missing_split_names_the_fetch_command(tmp_path):
    write_mmlu(tmp_path, ROWS)
    with pytest.raises(FileNotFoundError, match="data.py --mmlu"):
        mmlu.load_mmlu(tmp_path, "dev")
    with pytest.raises(ValueError, match="split 'train' does not exist"):
        mmlu.load_mmlu(tmp_path, "train")


@pytest.mark.parametrize("text, error", [
    ('q,a,b,c,D\n"q2",a,b,c,d,E\n', r"bad_test.csv line 1: expected 6 fields"),
    ('q,a,b,c,d,D\n"q2",a,b,c,d,E\n', r"bad_test.csv line 2: answer 'E'"),
])
def test_bad_rows_name_file_and_line(tmp_path, text, error):
    write_mmlu(tmp_path, ROWS)
    (tmp_path / "test" / "bad_test.csv").write_text(text)
    with pytest.raises(ValueError, match=error):
        mmlu.load_mmlu(tmp_path, "test")


def test_only_the_subjects_asked_for_are_read(tmp_path):
    """A bad row in a subject nobody asked for does not stop the others (only their files are
    read), and is still found when every subject is read."""
    write_mmlu(tmp_path, ROWS)
    (tmp_path / "test" / "bad_test.csv").write_text("q,a,b,c,d,E\n")
    assert mmlu.load_mmlu(tmp_path, "test", "algebra")["algebra"][0]["answer"] == "D"
    with pytest.raises(ValueError, match="bad_test.csv line 1"):
        mmlu.load_mmlu(tmp_path, "test")


def test_real_folder_matches_published_counts(shared_data):
    folder = shared_data / "mmlu"
    expect = {}
    for row in list(csv.reader(open(folder / "COUNTS.tsv"), delimiter="\t"))[1:]:
        expect[row[0]] = dict(zip(["dev", "val", "test"], map(int, row[1:])))
    total = expect.pop("TOTAL")
    assert total == {"dev": 285, "val": 1531, "test": 14042}  # the published sizes
    for split in ["dev", "val", "test"]:
        got = mmlu.load_mmlu(folder, split)
        assert {s: len(v) for s, v in got.items()} == {s: c[split] for s, c in expect.items()}


def test_hub_layout_from_the_offline_cache(tmp_path):
    """cais/mmlu's parquet schema (integer answer, choices list), read from a Hugging Face cache
    without network."""
    rows = [{"question": LONG_Q, "subject": "geese", "choices": list("abcd"), "answer": 2},
            {"question": "1+1?", "subject": "algebra", "choices": list("1234"), "answer": 1}]
    repo = tmp_path / "hf" / "hub" / "datasets--cais--mmlu"
    snap = repo / "snapshots" / ("0" * 40) / "all"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    pq.write_table(pa.Table.from_pylist(rows), snap / "test-00000-of-00001.parquet")
    code = "import json, mmlu; print(json.dumps(mmlu.load_mmlu('hub', 'test')))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "algebra": [{"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": "B"}],
        "geese": [{"question": LONG_Q, "choices": ["a", "b", "c", "d"], "answer": "C"}]}


def test_save_then_load_round_trip(tmp_path, monkeypatch):
    """save_mmlu writes what load_mmlu reads back, commas and quotes included."""
    items = {"geese": [{"question": LONG_Q + ' "quoted", yes', "choices": ["a, b", "c", "d", "e"],
                        "answer": "C"}]}
    monkeypatch.setattr(mmlu, "_load_hub", lambda split: items)
    mmlu.save_mmlu(tmp_path)
    for split in mmlu.MMLU_SPLITS:
        assert mmlu.load_mmlu(tmp_path, split) == items
