"""The multiple-choice presets (mc_data.py) through data.py: hand-written rows in each hub source's
own layout (field names as on the dataset cards), written as parquet where the hub loader would
find them, rendered as plain text and as chat, checked character by character against
eval_mmlu.py's own prompt builders and through the tokenizer round trip; decontamination against
MMLU's test set counted."""
import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import eval_mmlu
import mmlu
import mc_data
import readers
import shards

# Each source's train rows in its real layout. Two rows get dropped on purpose: ARC's 3-choice row
# (under four choices) and the one that quotes an MMLU test question (see mmlu_dir).
LEAK = ("Which of the following best describes the balance the lighthouse keeper kept between the "
        "tides and the lamps")
ROWS = {
    "mmlu-aux": [  # the auxiliary_train config nests each row under "train"
        {"train": {"question": "What do plants need to make food?", "subject": "",
                   "choices": ["sunlight", "sand", "salt", "smoke"], "answer": 0}},
        {"train": {"question": f"{LEAK}?", "subject": "",
                   "choices": ["care", "luck", "oil", "rope"], "answer": 1}},
        {"train": {"question": " Which is a mammal? ", "subject": "",
                   "choices": ["shark", "trout", "whale", "eel"], "answer": 2}},
        {"train": {"question": "What is 3 x 4?", "subject": "",
                   "choices": ["7", "12", "34", "1"], "answer": 1}}],
    "arc-easy": [
        {"id": "Mercury_1", "question": "Which unit measures mass?",
         "choices": {"text": ["meter", "gram", "liter", "second"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
        {"id": "NYSEDREGENTS_2", "question": "Which tool measures temperature?",
         "choices": {"text": ["ruler", "scale", "clock", "thermometer"],
                     "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
        {"id": "Mercury_3", "question": "Which is a gas at room temperature?",
         "choices": {"text": ["iron", "oxygen", "wood"], "label": ["A", "B", "C"]},
         "answerKey": "B"}],
    "arc-challenge": [
        {"id": "Mercury_9", "question": "Which process forms rain?",
         "choices": {"text": ["erosion", "melting", "condensation", "freezing", "rusting"],
                     "label": ["A", "B", "C", "D", "E"]}, "answerKey": "C"}],
    "openbookqa": [
        {"id": "7-980", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies learning new tricks", "plants sprouting and growing",
                              "children growing up", "flowers wilting"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"}],
    "commonsenseqa": [
        {"id": "075e483d", "question": "Where would you put a plate after washing it?",
         "question_concept": "plate",
         "choices": {"label": ["A", "B", "C", "D", "E"],
                     "text": ["cupboard", "oven", "garden", "floor", "roof"]},
         "answerKey": "A"}],
}
# The questions as eval_mmlu.py must see them: (question, choices, answer) after to_item.
EXPECTED = {
    "mmlu-aux": [("What do plants need to make food?", ["sunlight", "sand", "salt", "smoke"], "A"),
                 (" Which is a mammal? ", ["shark", "trout", "whale", "eel"], "C"),
                 ("What is 3 x 4?", ["7", "12", "34", "1"], "B")],
    "arc-easy": [("Which unit measures mass?", ["meter", "gram", "liter", "second"], "B"),
                 ("Which tool measures temperature?", ["ruler", "scale", "clock", "thermometer"],
                  "D")],
    "openbookqa": [("The sun is responsible for", ["puppies learning new tricks",
                    "plants sprouting and growing", "children growing up", "flowers wilting"],
                    "B")],
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """readers.hub_files answers from parquet files written here, as the hub's cache would."""
    files = {}
    for name, rows in ROWS.items():
        path = tmp_path / "hub" / name / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        files[name] = path

    def hub_files(preset, repo, patterns, max_files=None, fix=None):
        assert (repo, patterns) == mc_data.MC_PRESETS[preset][:2]
        return [files[preset]]
    monkeypatch.setattr(readers, "hub_files", hub_files)
    return files


@pytest.fixture
def mmlu_dir(tmp_path):
    """An MMLU folder whose one test question shares 13 words with the leaking mmlu-aux row."""
    d = tmp_path / "mmlu" / "test"
    d.mkdir(parents=True)
    with open(d / "lighthouses_test.csv", "w", newline="") as f:
        csv.writer(f).writerow([f"{LEAK} in the old story?", "a", "b", "c", "d", "A"])
    return d.parent


def items(name):
    return [{"question": q, "choices": c, "answer": a} for q, c, a in EXPECTED[name]]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_five_choices_keep_the_answer_and_three_distractors():
    for name in ("arc-challenge", "commonsenseqa"):
        row = ROWS[name][0]
        item, why = mc_data.to_item(row)
        gold = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        assert why is None and len(item["choices"]) == 4
        assert item["choices"][mmlu.LETTERS.index(item["answer"])] == gold
        # the order of the kept choices is the source's
        kept = [t for t in row["choices"]["text"] if t in item["choices"]]
        assert kept == item["choices"]
        assert mc_data.to_item(row) == (item, None)  # the same choice is dropped every time


def test_bad_rows_are_counted_not_kept():
    assert mc_data.to_item(ROWS["arc-easy"][2]) == (None, "under_4_choices")
    assert mc_data.to_item({"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 7}) == \
        (None, "bad_record")
    assert mc_data.to_item({"text": "not a question"}) == (None, "bad_record")
    assert mc_data.to_item(None) == (None, "bad_record")


def test_text_prep_renders_eval_mmlus_prompt_exactly(hub, mmlu_dir, tok_dir, tok, tmp_path):
    out = tmp_path / "mc"
    data.main(["--source", "mmlu-aux", "arc-easy", "openbookqa", "--tokenizer", str(tok_dir),
               "--out", str(out), "--mmlu_dir", str(mmlu_dir), "--val_fraction", "0",
               "--workers", "1"])
    texts = []
    for name in ("mmlu-aux", "arc-easy", "openbookqa"):
        docs = [r["text"] for r in read_jsonl(out / "mc_rendered" / f"{name}.jsonl")]
        # documents of 1, 2, .. questions in turn: each is eval_mmlu's prompt for its last
        # question with the others as the shots, followed by " " + the answer letter
        its = items(name)
        chunks = []
        while its:
            k = len(chunks) % 5 + 1
            chunks.append(its[:k])
            its = its[k:]
        subject = mc_data.MC_PRESETS[name][3]
        assert docs == [mmlu.build_prompt(subject, c[-1], c[:-1]) + " " + c[-1]["answer"]
                        for c in chunks]
        texts += docs
    assert any(doc.count("\nAnswer: ") == 2 for doc in texts)  # a 1-shot document was checked
    # and written out by hand, as lm-eval's mmlu template renders it (not through mmlu.py)
    arc = [r["text"] for r in read_jsonl(out / "mc_rendered" / "arc-easy.jsonl")]
    assert arc[0] == ("The following are multiple choice questions (with answers) about science."
                      "\n\nWhich unit measures mass?\nA. meter\nB. gram\nC. liter\nD. second"
                      "\nAnswer: B")
    # the shards hold exactly these documents, each after <|bos|>
    ids = np.concatenate([shards.read_shard(p) for p in sorted(out.glob("train_*.bin"))])
    docs = tok.decode([int(i) for i in ids]).split(tok.decode([tok.bos_id]))[1:]
    assert sorted(docs) == sorted(texts)
    meta = json.loads((out / "meta.json").read_text())["multiple_choice"]
    assert meta["mmlu-aux"] == {"rows": 4, "kept": 3, "contaminated": 1}
    assert meta["arc-easy"] == {"rows": 3, "kept": 2, "contaminated": 0, "under_4_choices": 1}


def test_chat_prep_renders_eval_mmlus_chat_turn_exactly(hub, mmlu_dir, tok_dir, tok, tmp_path):
    out = tmp_path / "chat"
    names = ["mmlu-aux", "arc-easy", "openbookqa"]
    data.main(["--sft", "--source", *names, "--tokenizer", str(tok_dir), "--out", str(out),
               "--mmlu_dir", str(mmlu_dir), "--val_fraction", "0"])
    convs = []
    for name in names:
        recs = read_jsonl(out / "mc_rendered" / f"{name}_chat.jsonl")
        want = [mmlu.chat_messages(it, []) + [{"role": "assistant", "content": it["answer"]}]
                for it in items(name)]
        assert [r["messages"] for r in recs] == want
        convs += want
    first = read_jsonl(out / "mc_rendered" / "arc-easy_chat.jsonl")[0]["messages"]
    assert first == [{"role": "user", "content": "Which unit measures mass?\nA. meter\nB. gram\n"
                      "C. liter\nD. second\nAnswer with the letter."},
                     {"role": "assistant", "content": "B"}]   # by hand, not through mmlu.py
    # the SFT arrays hold exactly these conversations as the chat template renders them
    ids = np.load(out / "train_ids.npy")
    offsets = np.load(out / "train_offsets.npy")
    got = {tuple(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:])}
    assert got == {tuple(tok.render_chat(m)[0]) for m in convs}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["multiple_choice"]["mmlu-aux"]["contaminated"] == 1


def test_real_mmlu_test_questions_are_removed(hub, tok_dir, tmp_path, shared_data, monkeypatch):
    """A row that quotes a real MMLU test question (../shared/data/mmlu) is dropped and counted."""
    mmlu_dir = shared_data / "mmlu"
    real = next(it for items_ in eval_mmlu.mmlu.load_mmlu(mmlu_dir, "test").values()
                for it in items_ if len(it["question"].split()) > 20)
    rows = [{"train": {"question": real["question"], "subject": "",
                            "choices": real["choices"], "answer": 0}}] + ROWS["mmlu-aux"][:1]
    pq.write_table(pa.Table.from_pylist(rows), hub["mmlu-aux"])
    out = tmp_path / "real"
    data.main(["--sft", "--source", "mmlu-aux", "--tokenizer", str(tok_dir), "--out", str(out),
               "--mmlu_dir", str(mmlu_dir), "--val_fraction", "0"])
    meta = json.loads((out / "meta.json").read_text())["multiple_choice"]["mmlu-aux"]
    assert meta == {"rows": 2, "kept": 1, "contaminated": 1}


def test_an_unknown_preset_names_the_multiple_choice_ones(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="arc-easy"):
        data.main(["--source", "arc", "--tokenizer", str(tok_dir), "--out", str(tmp_path)])
