"""sft_data.py: record formats, malformed records counted, weights, MMLU decontamination, the
written arrays."""
import csv
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bpe
from conftest import UNICODE_WORDS
import sft_data

LONG_Q = ("Which of the following best describes the reason that the migrating geese of the "
          "northern lakes fly in a wide V formation every autumn?")


GOOD = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"conversations": [{"from": "human", "value": "Name a river"},
                       {"from": "gpt", "value": "The Rhine."}]},
    {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"},
    {"question": "What is 6 times 7?", "answer": "6*7 = <<6*7=42>>42\n#### 42"},
    {"instruction": "Capitalise it", "instances": [{"input": "paris", "output": "Paris"}],
     "id": "t1"},
]
EXPECT = [
    GOOD[0]["messages"],
    [{"role": "user", "content": "Name a river"}, {"role": "assistant", "content": "The Rhine."}],
    [{"role": "user", "content": "Add the numbers\n\n2 and 3"},
     {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": GOOD[4]["question"]},
     {"role": "assistant", "content": GOOD[4]["answer"]}],
    [{"role": "user", "content": "Capitalise it\n\nparis"},
     {"role": "assistant", "content": "Paris"}],
]
BAD = ['{"messages": [{"role": "wizard", "content": "x"}]}', '{"messages": "hello"}', '[1, 2]',
       '{"text": "no chat here"}', '{"messages": [{"role": "user", "content": "only a question"}]}',
       '{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
       '{"instruction": "Write", "output": 5}',
       '{"messages": [{"role": "user", "content": "' + "long " * 300 + '"}, '
       '{"role": "assistant", "content": "ok"}]}',
       "{not json"]


@pytest.mark.parametrize("i", range(len(GOOD)))
def test_to_messages_of_each_format(i):
    assert sft_data.to_messages(GOOD[i]) == (EXPECT[i], None)


def test_load_sft_reads_every_format_with_weights(tok, tmp_path):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(g) + "\n" for g in GOOD[:4]))
    pq.write_table(pa.Table.from_pylist(GOOD[4:5]), tmp_path / "gsm.parquet")
    (tmp_path / "si.jsonl").write_text(json.dumps(GOOD[5]) + "\n")
    inputs = [str(tmp_path / "chat.jsonl"), f"{tmp_path / 'gsm.parquet'}:2",
              f"{tmp_path / 'si.jsonl'}:0.5"]
    convs, counts = sft_data.load_sft(inputs, tok, max_len=200)
    assert counts == {"records": 6, "kept": 6}
    # gsm has weight 2; si 0.5 of one record rounds to none
    assert convs == [tok.render_chat(m) for m in EXPECT[:5]] + [tok.render_chat(EXPECT[4])]


def test_load_sft_counts_malformed_records(tok, tmp_path):
    lines = [json.dumps(GOOD[0])] + BAD
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    convs, counts = sft_data.load_sft([str(tmp_path / "chat.jsonl")], tok, max_len=200)
    assert counts == {"records": 10, "kept": 1, "bad_messages": 4, "not_an_object": 1,
                      "unknown_format": 1, "no_assistant": 1, "too_long": 1, "bad_json": 1}
    assert convs == [tok.render_chat(EXPECT[0])]


def test_no_usable_record_is_an_error(tok, tmp_path):
    (tmp_path / "bad.jsonl").write_text("\n".join(BAD) + "\n")
    with pytest.raises(ValueError, match="no usable SFT records"):
        sft_data.load_sft([str(tmp_path / "bad.jsonl")], tok, max_len=200)


@pytest.fixture
def chats_with_leak(tmp_path):
    """60 random chats and one that quotes an MMLU test question, plus that MMLU folder."""
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    with open(tmp_path / "mmlu" / "test" / "geese_test.csv", "w", newline="") as f:
        csv.writer(f).writerow([LONG_Q, "Wind", "Sun", "Food", "Heat", "A"])
    rng = random.Random(0)

    def say(lo, hi):
        return " ".join(rng.choice(UNICODE_WORDS) for _ in range(rng.randint(lo, hi)))
    chats = [[{"role": "user", "content": say(3, 30)}, {"role": "assistant", "content": say(1, 30)}]
             for _ in range(60)]
    leak = [{"role": "user", "content": "Quiz: " + LONG_Q.upper() + " Think."},
            {"role": "assistant", "content": "Wind."}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats + [leak]))
    return path, chats, tmp_path / "mmlu"


def test_decontamination_drops_the_mmlu_overlap(tok, tok_dir, tmp_path, chats_with_leak):
    path, _, mmlu_dir = chats_with_leak
    meta = sft_data.prepare_sft([str(path)], tok_dir, tmp_path / "sft", max_len=120,
                                val_fraction=0.1, mmlu_dir=mmlu_dir)
    assert meta["counts"]["contaminated"] == meta["decontamination"]["removed"] == 1
    assert meta["train_conversations"] + meta["val_conversations"] == 60
    assert meta["val_conversations"] > 0
    assert bpe.Tokenizer.load(tmp_path / "sft").hash == tok.hash


def test_no_decontam_keeps_the_overlap(tok_dir, tmp_path, chats_with_leak):
    path, _, mmlu_dir = chats_with_leak
    kept = sft_data.prepare_sft([str(path)], tok_dir, tmp_path / "sft2", max_len=1000,
                                mmlu_dir=mmlu_dir, decontaminate=False)
    assert kept["train_conversations"] + kept["val_conversations"] == 61


def test_arrays_hold_the_rendered_conversations(tok, tok_dir, tmp_path, chats_with_leak):
    """Reading the .npy files back gives exactly render_chat of every kept chat, once."""
    path, chats, mmlu_dir = chats_with_leak
    sft_data.prepare_sft([str(path)], tok_dir, tmp_path / "sft", max_len=1000, val_fraction=0.1,
                         mmlu_dir=mmlu_dir)
    got = []
    for split in ("train", "val"):
        ids, mask, offsets = (np.load(tmp_path / "sft" / f"{split}_{k}.npy")
                              for k in ("ids", "mask", "offsets"))
        assert ids.dtype == np.uint16 and mask.dtype == np.uint8 and offsets.dtype == np.int64
        got += [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(offsets, offsets[1:])]
    want = [tok.render_chat(c) for c in chats]
    assert sorted(got) == sorted(want)
