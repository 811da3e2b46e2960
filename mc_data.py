"""Multiple-choice training data (issue 16): the hub's 4-choice train sets, each question rendered
the two ways kiln's MMLU scores it, decontaminated against MMLU's test set.

    python data.py --source mmlu-aux commonsenseqa --tokenizer data/tok \
        --out data/mc                     # plain text: token shards for config/mid.py
    python data.py --sft --source smoltalk mmlu-aux commonsenseqa \
        --tokenizer data/tok --out data/smoltalk_mc   # chat turns mixed into SFT

mmlu-aux (MMLU's auxiliary_train) is made of ARC, MCTest, OpenBookQA and RACE: arc-easy,
arc-challenge and openbookqa are for runs without it, not beside it (their questions twice).

Plain text (pretraining shards): lm-eval's `mmlu` prompt, exactly what `eval_mmlu.py` scores,
    "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
    + "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {letter}", k questions a document
    (k = 1, 2, .., 5 in turn, so both 0-shot and 5-shot contexts are seen), a blank line between.
Chat (SFT): the user turn of `eval_mmlu.py --chat` ("{question}\\nA. ..\\nD. {D}\\nAnswer with the
letter."), the assistant's reply the bare letter.
Questions with more than four choices keep the answer and three distractors (the dropped ones
picked by a hash of the question, so every run renders the same text); fewer than four: dropped
and counted. A question whose text or choices share a 13-word n-gram with an MMLU test question
is dropped and counted (sft_data.ngrams, GPT-3's check). The rendered records go to
OUT/mc_rendered/PRESET.jsonl, then through the ordinary preparation (data.prepare or
sft_data.prepare_sft); the counts go into OUT/meta.json under "multiple_choice".
"""
import hashlib
import json
import random
from pathlib import Path

import common
import mmlu
import readers
import sft_data

# name -> (hub repo, file patterns, licence on the dataset card, subject in the prompt's header).
# SciQ (allenai/sciq) is left out: CC BY-NC 3.0, non-commercial only.
MC_PRESETS = {
    "mmlu-aux": ("cais/mmlu", ["auxiliary_train/train-*.parquet"], "MIT", "miscellaneous"),
    "arc-easy": ("allenai/ai2_arc", ["ARC-Easy/train-*.parquet"], "CC BY-SA 4.0", "science"),
    "arc-challenge": ("allenai/ai2_arc", ["ARC-Challenge/train-*.parquet"], "CC BY-SA 4.0",
                      "science"),
    "openbookqa": ("allenai/openbookqa", ["main/train-*.parquet"],
                   "unknown on the card (AI2's release: Apache 2.0)", "science"),
    "commonsenseqa": ("tau/commonsense_qa", ["data/train-*.parquet"], "MIT", "commonsense"),
}
MAX_SHOTS = 5  # the longest document: as many questions as eval_mmlu.py's 5-shot prompt


# ---- the two renderings: mmlu.py's prompt (what eval_mmlu.py scores), and its chat turn
def text_document(subject, items):
    """The plain-text prompt of len(items) - 1 examples and a question, then its answer."""
    return mmlu.build_prompt(subject, items[-1], items[:-1]) + " " + items[-1]["answer"]


def chat_record(item):
    """The question as eval_mmlu.py --chat asks it, answered with the bare letter."""
    return {"messages": mmlu.chat_messages(item, []) + [{"role": "assistant",
                                                        "content": item["answer"]}]}


# ---- reading each source's rows
def _choices(r):
    """(choice texts, index of the answer) from either layout: a list with an integer answer
    (cais/mmlu) or {text, label} with an answerKey (ARC, OpenBookQA, CommonsenseQA)."""
    c = r.get("choices")
    if isinstance(c, list) and isinstance(r.get("answer"), int):
        return c, r["answer"]
    if isinstance(c, dict) and isinstance(c.get("text"), list) and isinstance(c.get("label"),
                                                                                list):
        key = r.get("answerKey")
        return c["text"], c["label"].index(key) if key in c["label"] else None
    return None, None


def to_item(r):
    """({question, choices (4), answer letter}, None) or (None, why the row is dropped)."""
    if isinstance(r, dict) and isinstance(r.get("train"), dict):
        r = r["train"]  # cais/mmlu's auxiliary_train config nests each row under "train"
    if not isinstance(r, dict):
        return None, "bad_record"
    question = r.get("question", r.get("question_stem"))
    texts, answer = _choices(r)
    if not isinstance(question, str) or not question.strip() or texts is None or answer is None \
            or not 0 <= answer < len(texts) or not all(isinstance(t, str) for t in texts):
        return None, "bad_record"
    if len(texts) < 4:
        return None, "under_4_choices"
    if len(texts) > 4:
        seed = hashlib.blake2b(question.encode(), digest_size=8).digest()
        wrong = [i for i in range(len(texts)) if i != answer]
        drop = set(random.Random(seed).sample(wrong, len(texts) - 4))
        answer -= sum(i < answer for i in drop)
        texts = [t for i, t in enumerate(texts) if i not in drop]
    return {"question": question, "choices": list(texts), "answer": mmlu.LETTERS[answer]}, None


def render(name, files, chat, out_dir, grams):
    """One preset's rows -> OUT/mc_rendered/NAME.jsonl (chat records, or text documents) and the
    counts: rows read, questions kept, and each reason a row was dropped."""
    counts = {"rows": 0, "kept": 0, "contaminated": 0}
    items = []
    for path in files:
        for r in readers.iter_records(path):
            counts["rows"] += 1
            item, why = to_item(r)
            question = item and mmlu.doc_text(item).removesuffix("Answer:")
            if item and grams and sft_data.ngrams(question) & grams:
                why = "contaminated"
            if why:
                counts[why] = counts.get(why, 0) + 1
                continue
            items.append(item)
    counts["kept"] = len(items)
    if not items:
        raise ValueError(f"preset {name}: no usable 4-choice questions in "
                         f"{[str(f) for f in files]} ({counts}); check that the files are "
                         f"{MC_PRESETS[name][0]}'s train split")
    if chat:
        records = [chat_record(it) for it in items]
    else:
        subject = MC_PRESETS[name][3]
        records = []
        i = 0
        while i < len(items):
            k = len(records) % MAX_SHOTS + 1
            records.append({"text": text_document(subject, items[i:i + k])})
            i += k
    out = Path(out_dir) / "mc_rendered" / f"{name}{'_chat' if chat else ''}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    common.write_atomic(out, "".join(json.dumps(r) + "\n" for r in records).encode())
    print(f"{name} ({MC_PRESETS[name][2]}): {counts['kept']:,} of {counts['rows']:,} questions "
          f"kept, {counts['contaminated']} dropped for 13-gram overlap with MMLU test; {counts}")
    return out, counts
