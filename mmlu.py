"""MMLU questions: read from the original CSV layout or the hub (cais/mmlu), saved in that layout.

    items = load_mmlu("data/mmlu", "test")  # {subject: [{question, choices, answer 'A'..'D'}]}
    python data.py --mmlu --out data/mmlu   # fetch cais/mmlu into the CSV layout, or check it

    build_prompt(subject, item, shots)      # lm-eval's `mmlu` prompt, as eval_mmlu.py scores it

eval_mmlu.py scores these; sft_data.py drops SFT records that overlap the test questions; mc_data.py
renders other multiple-choice sets in the same prompt.
"""
import csv
import io
from pathlib import Path

import common
import readers

MMLU_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}  # ours -> cais/mmlu's
ROOT = Path(__file__).resolve().parent


def _load_hub(split):
    """cais/mmlu's parquet files (integer answers), downloaded or from the Hugging Face cache."""
    import pyarrow.parquet as pq
    fix = ("put MMLU in its original CSV layout (dev/, val/, test/ with <subject>_<split>.csv) in "
           "data/mmlu, or run `python data.py --mmlu --out data/mmlu` where there is network")
    patterns = [f"all/{MMLU_SPLITS[split]}-*.parquet"]
    data = {}
    for f in readers.hub_files("mmlu", "cais/mmlu", patterns, fix=fix):
        columns = ["question", "subject", "choices", "answer"]
        for r in pq.read_table(f, columns=columns).to_pylist():
            item = {"question": r["question"], "choices": list(r["choices"]),
                    "answer": "ABCD"[r["answer"]]}
            data.setdefault(r["subject"], []).append(item)
    return dict(sorted(data.items()))


def _csv_files(source, split):
    """{subject: file} in the original release's layout: {split}/<subject>_{split}.csv."""
    files = sorted((Path(source) / split).glob(f"*_{split}.csv"))
    if not files:
        raise FileNotFoundError(f"no {split}/<subject>_{split}.csv files in MMLU folder {source}: "
                                f"fetch them with `python data.py --mmlu --out {source}`")
    return {f.name[:-len(f"_{split}.csv")]: f for f in files}


def _read_csv(f):
    """One subject's questions: no header, 6 fields a row."""
    items = []
    with open(f, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        for row in reader:
            where = f"{f} line {reader.line_num}"
            if len(row) != 6:
                raise ValueError(f"{where}: expected 6 fields (question, A, B, C, D, answer), "
                                 f"got {len(row)}; fix or remove that row")
            if row[5].strip() not in ("A", "B", "C", "D"):
                raise ValueError(f"{where}: answer {row[5]!r} is not A, B, C or D; fix that row")
            items.append({"question": row[0], "choices": row[1:5], "answer": row[5].strip()})
    return items


def load_mmlu(source, split="test", subjects=None):
    """{subject: [{question, choices (4 str), answer 'A'..'D'}]} from "hub" (cais/mmlu) or a folder
    laid out as the original release: {dev,val,test}/<subject>_<split>.csv (only the files of
    the subjects asked for are read)."""
    if split not in MMLU_SPLITS:
        raise ValueError(f"MMLU split {split!r} does not exist: use one of "
                         f"{', '.join(MMLU_SPLITS)}")
    hub = str(source) == "hub"
    found = _load_hub(split) if hub else _csv_files(source, split)
    if isinstance(subjects, str):
        subjects = subjects.split(",")
    subjects = list(subjects or found)
    missing = [s for s in subjects if s not in found]
    if missing:
        raise ValueError(f"MMLU subject(s) {', '.join(missing)} not in {source} {split}; "
                         f"available: {', '.join(found)}")
    return {s: found[s] if hub else _read_csv(found[s]) for s in subjects}


def save_mmlu(out_dir):
    """Fetch cais/mmlu into the original CSV layout (what load_mmlu(folder) reads)."""
    for split in MMLU_SPLITS:
        (Path(out_dir) / split).mkdir(parents=True, exist_ok=True)
        for subject, items in load_mmlu("hub", split).items():
            buf = io.StringIO()
            rows = ([it["question"], *it["choices"], it["answer"]] for it in items)
            csv.writer(buf, lineterminator="\n").writerows(rows)
            path = Path(out_dir) / split / f"{subject}_{split}.csv"
            common.write_atomic(path, buf.getvalue().encode())


def default_mmlu_dir():
    """data/mmlu in the checkout, else ../shared/data/mmlu beside it, else None."""
    for folder in (ROOT / "data" / "mmlu", ROOT.parent / "shared" / "data" / "mmlu"):
        if (folder / "test").is_dir():
            return folder
    return None


def fetch_or_check(out_dir):
    """`python data.py --mmlu --out DIR`: fetch MMLU into DIR unless it is there, then read every
    split, which checks every row."""
    out = Path(out_dir)
    if not (out / "test").is_dir():
        save_mmlu(out)
    for split in MMLU_SPLITS:
        if (out / split).is_dir():
            d = load_mmlu(out, split)
            n = sum(map(len, d.values()))
            print(f"{out}/{split}: {len(d)} subjects, {n:,} questions, all rows valid")


# ---- The prompt: lm-eval's `mmlu` template (doc_to_text, few-shot from dev), and its chat form
LETTERS = "ABCD"


def doc_text(item, method="letter"):
    """One question as lm-eval's doc_to_text renders it."""
    if method == "cloze":
        return f"Question: {item['question'].strip()}\nAnswer:"
    choices = "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, item["choices"]))
    return item["question"].strip() + choices + "\nAnswer:"


def build_prompt(subject, item, shots, method="letter"):
    """The context string: description, each example with " " + its answer and a blank line, then
    the question."""
    kind = "multiple choice questions" if method == "letter" else "questions"

    def gold(ex):  # cloze: the answer's text; letter: the letter
        return ex["choices"][LETTERS.index(ex["answer"])] if method == "cloze" else ex["answer"]
    head = f"The following are {kind} (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = "".join(f"{doc_text(ex, method)} {gold(ex)}\n\n" for ex in shots)
    return head + examples + doc_text(item, method)


def chat_messages(item, shots):
    """--chat: few-shot examples as earlier turns, the question as the last user turn."""
    def user(ex):
        question = doc_text(ex).removesuffix("Answer:")
        return {"role": "user", "content": question + "Answer with the letter."}
    turns = [m for ex in shots for m in (user(ex), {"role": "assistant", "content": ex["answer"]})]
    return turns + [user(item)]
