"""The whole pipeline on a built-in corpus: an invented world, generated from a seed, nothing
downloaded.

    python demo.py world --out data/demo_raw [--seed 0] [--people 48] [--docs 8000]
    python demo.py world --out data/demo_raw --people 24 --docs 6000      # what `make demo` runs
    python demo.py report --out out/demo     # after `make demo` ran the stages: out/demo/report.md
    python demo.py world --help              # each command's options

`make demo` runs every stage (world -> tokenizer -> shards -> pretrain -> SFT -> multiple choice ->
chat) and ends with the report card. The world is a few dozen people, each with a home town, a job,
a pet, a favourite colour, food and sport, an age and a friend. The pretraining text states every
fact many times in varied sentence forms and in short stories (varied rephrasings are what lets a
model later answer questions about facts it only read in prose: Allen-Zhu & Li, "Physics of
Language Models 3.1", arXiv:2309.14316). The chat set asks about some facts; the 4-choice test asks
about the others, so no test fact is ever seen in question form. The four choices are the group of
values that holds the true one, in a fixed order (see ATTRS), and the test's answer letters are
balanced, so chance is 25%.

world writes into --out:
    pretrain.jsonl           {"text": ...} documents for bpe.py and data.py
    chat.jsonl               {"messages": [...]} conversations for data.py --sft
    mmlu/{dev,test}/demo_world_{dev,test}.csv   the MMLU layout that eval_mmlu.py reads
    prompts.txt              open questions about test facts, for sample.py in the report
"""
import csv
import io
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint
import common
import config
import llm
import runlog

SUBJECT = "demo_world"
LETTERS = "ABCD"

FIRST = {"she": ("Anna Maria Clara Ella Rosa Nora Lucy Ida Mona Vera Hanna Iris Greta Olga Tessa "
                 "Wendy Lena Sofia Petra Zoe").split(),
         "he": ("Tom Felix Oscar Hugo Leo Max Paul Ivan Otto Carl Emil Jonas Bruno Dean Victor Sam "
                "Ben Omar Milo Karl").split()}
LAST = ("Stone Brook Miller Fisher Hill Wood Lake Frost Baker Reed Marsh Fox Field Rivers Moss "
        "Bell Hart Snow Gray Wells Cole Ford Lane Dale").split()
TOWNS = ("Millford Ashby Redwater Oakvale Pinecrest Stonebridge Greenhill Westport Lindon "
         "Brightmoor Elmstead Cobbleton").split()
# attribute -> its values, in groups of four: a 4-choice question shows the group that holds the
# true value, always in this order, so each value keeps its letter: the easiest form of the letter
# task (the letter is a function of the recalled value). Small models still score near chance on
# the letter task, so the report also gives cloze accuracy.
ATTRS = {
    "town": TOWNS,
    "job": ("baker farmer teacher doctor painter sailor miner tailor singer builder nurse "
            "judge").split(),
    "pet": ["cat", "dog", "parrot", "rabbit", "goat", "horse", "turtle", "owl"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "food": ["soup", "bread", "apples", "cheese", "rice", "fish", "cake", "plums"],
    "sport": ["tennis", "chess", "rowing", "running", "football", "archery", "skiing", "boxing"],
}
# Statements: many forms per fact. {n} = full name, {v} = value, {pp} = possessive pronoun.
SAY = {
    "town": ["{n} lives in {v}.", "{n} comes from {v}.", "The home town of {n} is {v}.",
             "{n} grew up in {v}.", "{n} has a house in {v}.", "{v} is where {n} lives.",
             "{n} is from the town of {v}."],
    "job": ["{n} works as a {v}.", "{n} is a {v}.", "The job of {n} is {v}.",
            "By trade, {n} is a {v}.", "{n} earns a living as a {v}.",
            "Everyone knows {n} as the {v}.", "{n} has worked as a {v} for years."],
    "pet": ["{n} has a pet {v}.", "{n} keeps a {v} at home.", "The pet of {n} is a {v}.",
            "{n} takes care of a {v}.", "At home, {n} looks after a {v}.",
            "{n} owns a {v} as a pet."],
    "color": ["The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.",
              "{n} loves the colour {v}.", "{n} often wears {v}, {pp} favourite colour.",
              "Of all colours, {n} likes {v} most."],
    "food": ["The favourite food of {n} is {v}.", "{n} likes to eat {v} most of all.",
             "{n} loves {v}.", "For dinner, {n} would always choose {v}.",
             "Of all foods, {n} likes {v} best."],
    "sport": ["{n} plays {v}.", "The favourite sport of {n} is {v}.",
              "In {pp} free time, {n} does {v}.", "{n} is very good at {v}.",
              "{n} spends every weekend on {v}."],
    "age": ["{n} is {v} years old.", "The age of {n} is {v}.", "{n} turned {v} this year."],
    "friend": ["{n} is a good friend of {v}.", "The best friend of {n} is {v}.",
               "{n} and {v} are friends."],
}
ASK = {  # one question form per attribute, shared by the chat set and the test (the facts differ)
    "town": "Where does {n} live?", "job": "What is the job of {n}?",
    "pet": "What pet does {n} have?", "color": "What is the favourite colour of {n}?",
    "food": "What is the favourite food of {n}?", "sport": "What sport does {n} play?",
}
ANSWER = {"town": "{n} lives in {v}.", "job": "{n} works as a {v}.", "pet": "{n} has a pet {v}.",
          "color": "The favourite colour of {n} is {v}.",
          "food": "The favourite food of {n} is {v}.", "sport": "{n} plays {v}."}
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen").split()
WEATHER = ["It was a sunny morning", "It was raining", "The wind was cold", "It was a warm evening",
           "Snow was falling", "The sky was grey"]


def make_people(rng, n):
    """n people with distinct full names and random facts; each has a friend among the others."""
    names = [(g, f, last) for g in FIRST for f in FIRST[g] for last in LAST]
    rng.shuffle(names)
    people = []
    for g, first, last in names[:n]:
        p = {"name": f"{first} {last}", "first": first, "p": g,
             "pp": "her" if g == "she" else "his", "age": rng.randint(18, 80)}
        p.update({a: rng.choice(vals) for a, vals in ATTRS.items()})
        people.append(p)
    for i, p in enumerate(people):
        p["friend"] = people[(i + rng.randint(1, n - 1)) % n]["name"]
    return people


def say(rng, p, attr):
    s = rng.choice(SAY[attr]).format(n=p["name"], v=p[attr], pp=p["pp"])
    return s[0].upper() + s[1:]


def bio(rng, p):
    """All facts about one person, each in a random form, in a random order."""
    attrs = list(ATTRS) + ["age", "friend"]
    rng.shuffle(attrs)
    return " ".join(say(rng, p, a) for a in attrs)


def story(rng, people):
    """A short story about two people that restates their facts in narrative form."""
    a, b = rng.sample(people, 2)
    lines = [f"{rng.choice(WEATHER)} in {a['town']}. {a['name']}, the {a['job']}, went out with "
             f"{a['pp']} {a['pet']}.",
             f"On the road {a['p']} met {b['name']}, a {b['job']} from {b['town']}.",
             f"{b['name']} said: \"I am going home to {b['town']} to feed my {b['pet']}.\"",
             f"{a['name']} laughed and said: \"Then I will go home to {a['town']} and eat some "
             f"{a['food']}.\"",
             f"Later {a['name']} played {a['sport']} and {b['name']} played {b['sport']}.",
             f"{a['name']} wore {a['color']} that day, because {a['color']} is {a['pp']} "
             "favourite colour."]
    return " ".join(lines[:2] + rng.sample(lines[2:], rng.randint(2, 4)))


def town_doc(rng, town, people):
    here = [p for p in people if p["town"] == town]
    rng.shuffle(here)
    if not here:
        return f"{town} is a quiet town. Nobody we know lives in {town}."
    forms = ["{n}, the {j}, lives in {t}.", "The {j} {n} has a house in {t}.",
             "{n} works as a {j} in {t}.", "In {t} lives {n}, who is a {j}."]
    parts = [rng.choice([f"{town} is a small town.", f"Welcome to {town}.",
                         f"This is the town of {town}."])]
    return " ".join(parts + [rng.choice(forms).format(n=p["name"], j=p["job"], t=town)
                             for p in here])


def arithmetic(rng):
    """A few sums and differences in words and in digits (kept under twenty so words exist for
    them)."""
    out = []
    for _ in range(rng.randint(3, 6)):
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            out.append(rng.choice([f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}.",
                                   f"{x} + {y} = {x + y}."]))
        else:
            x, y = max(x, y), min(x, y)
            out.append(rng.choice([f"{NUMBERS[x]} minus {NUMBERS[y]} is {NUMBERS[x - y]}.",
                                   f"{x} - {y} = {x - y}."]))
    return " ".join(out)


def quiz(facts):
    """Questions with their answers in lm-eval's cloze layout (eval_mmlu.py --method cloze): the
    format, shown on chat facts only (test facts are never asked)."""
    return "The following are questions (with answers) about demo world.\n\n" + "\n\n".join(
        f"Question: {ASK[a].format(n=p['name'])}\nAnswer: {p[a]}" for p, a in facts)


def mc_prompt(question, choices):
    """A question as the user turn of `eval_mmlu.py --chat` (the reply is the bare letter)."""
    lines = "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, choices))
    return question + lines + "\nAnswer with the letter."


def mc_question(p, attr):
    """(question, 4 choices, answer letter): the group of four values that holds the true one, in
    fixed order."""
    i = ATTRS[attr].index(p[attr])
    return ASK[attr].format(n=p["name"]), ATTRS[attr][i - i % 4:i - i % 4 + 4], LETTERS[i % 4]


def make_world(seed=0, n_people=48, n_docs=8000, test_per_person=2, mc_copies=2):
    """Everything the demo needs, as Python objects: (people, docs, chats, mc_dev, mc_test,
    prompts)."""
    rng = random.Random(seed)
    people = make_people(rng, n_people)
    # Split the (person, attribute) facts: test_per_person per person are only ever asked in the
    # test, picked so that the test's answer letters stay balanced.
    test_facts = []
    chat_facts = []
    used = dict.fromkeys(LETTERS, 0)  # how often each letter answers a test question so far
    for p in people:
        attrs = rng.sample(list(ATTRS), len(ATTRS))
        for _ in range(test_per_person):
            # the least used letter; ties go to the first in attrs' random order
            a = min(attrs, key=lambda a: used[mc_question(p, a)[2]])
            used[mc_question(p, a)[2]] += 1
            test_facts.append((p, a))
            attrs.remove(a)
        chat_facts += [(p, a) for a in attrs]
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.55:
            docs.append(bio(rng, rng.choice(people)))
        elif r < 0.75:
            docs.append(story(rng, people))
        elif r < 0.82:
            docs.append(town_doc(rng, rng.choice(TOWNS), people))
        elif r < 0.9:
            docs.append(arithmetic(rng))
        else:  # questions and answers about chat facts (test facts are never asked)
            docs.append(quiz(rng.sample(chat_facts, 3)))
    # Chat: each chat fact as an open question and as 4-choice questions (the letter at a different
    # place each time: the format has to be learned from many examples), plus sums; one to three
    # turns per conversation.
    turns = [(ASK[a].format(n=p["name"]), ANSWER[a].format(n=p["name"], v=p[a]))
             for p, a in chat_facts]
    for p, a in chat_facts * mc_copies:
        q, choices, ans = mc_question(p, a)
        turns.append((mc_prompt(q, choices), ans))
    for _ in range(len(chat_facts) // 4):
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        turns.append((f"What is {NUMBERS[x]} plus {NUMBERS[y]}?",
                      f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}."))
    rng.shuffle(turns)
    chats = []
    i = 0
    while i < len(turns):
        k = rng.choice([1, 1, 2, 3])
        chats.append([m for u, a in turns[i:i + k]
                      for m in ({"role": "user", "content": u},
                                {"role": "assistant", "content": a})])
        i += k
    dev = [mc_question(p, a) for p, a in rng.sample(chat_facts, 8)]
    test = [mc_question(p, a) for p, a in test_facts]
    # Open questions about test facts (their answers were only ever read in prose) for the
    # report's samples.
    prompts = [{"question": ASK[a].format(n=p["name"]),
                "expected": ANSWER[a].format(n=p["name"], v=p[a])} for p, a in test_facts[:4]]
    prompts.append({"question": "What is three plus four?",
                    "expected": "three plus four is seven."})
    return people, docs, chats, dev, test, prompts


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    common.write_atomic(path, text.encode("utf-8"))


def csv_text(rows):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([q, *choices, ans] for q, choices, ans in rows)
    return buf.getvalue()


def cmd_world(args):
    n_names = sum(len(v) for v in FIRST.values()) * len(LAST)
    if not 4 <= args.people <= n_names:
        raise ValueError(f"--people {args.people} is out of range: the world needs 4 to {n_names} "
                         "people")
    if args.docs < 10:
        raise ValueError(f"--docs {args.docs} is too few: give at least 10 pretraining documents")
    people, docs, chats, dev, test, prompts = make_world(args.seed, args.people, args.docs)
    out = Path(args.out)
    write_text(out / "pretrain.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    write_text(out / "chat.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in chats))
    write_text(out / "mmlu" / "dev" / f"{SUBJECT}_dev.csv", csv_text(dev))
    write_text(out / "mmlu" / "test" / f"{SUBJECT}_test.csv", csv_text(test))
    write_text(out / "prompts.txt", "".join(p["question"] + "\n" for p in prompts))
    facts = [{k: v for k, v in p.items() if k not in ("first", "p", "pp")} for p in people]
    world = {"seed": args.seed, "people": facts, "prompts": prompts, "documents": len(docs),
             "conversations": len(chats), "test_questions": len(test)}
    # last: its presence means "complete"
    write_text(out / "world.json", json.dumps(world, indent=1) + "\n")
    n_chars = sum(len(d) for d in docs)
    print(f"world: {len(docs)} documents ({n_chars / 1e6:.2f} M characters), {len(chats)} "
          f"conversations, {len(test)} test questions -> {out}")


# --------------------------------------------------------------------------------------------------
# The report card: what the stages left behind (logs, eval JSON, chat transcript, stage times).


def read_times(path):
    """{stage: seconds} from timings.tsv, the newest time of each stage (a resumed stage appends
    again); {} when there is no file."""
    times = {}
    if Path(path).exists():
        for line in open(path):
            stage, sec = line.rstrip("\n").split("\t")
            times[stage] = float(sec)
    return times


def run_summary(run_dir):
    """(config dict, model config dict, parameter count, steps done) of a train.py run folder."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    meta = json.loads((checkpoint.find_checkpoint(run_dir) / "meta.json").read_text())
    with torch.device("meta"):  # shapes only, no memory
        n = llm.LLM(llm.model_config(meta["model_config"])).num_params()
    return cfg, meta["model_config"], n, meta["step"]


def chat_replies(transcript):
    """The replies in a `sample.py --chat` transcript (stdin piped, so stdout holds
    'you> bot> reply' lines)."""
    return [line.split("bot> ", 1)[1].strip() for line in transcript.splitlines()
            if "bot> " in line]


def conf(c):
    """A run config in one line: steps, batch, learning-rate schedule."""
    return (f"{c['max_iters']} steps of {c['total_batch_tokens']:,} tokens ({c['batch_size']} x "
            f"{c['block_size']}); lr {c['learning_rate']:g} -> {c['min_lr']:g}, warmup "
            f"{c['warmup_iters']}, {c['schedule']}, weight decay {c['weight_decay']:g}")


def cell(text):
    """text as one line of a markdown table cell."""
    return " ".join(text.replace("|", "\\|").split())


def mc_row(name, a):
    """A table row of 4-choice accuracy with its 95% interval."""
    return (f"| {name} | 25% (chance) | **{100 * a['acc']:.1f}%** (95% CI "
            f"{100 * a['ci95'][0]:.0f}-{100 * a['ci95'][1]:.0f}%, {a['n']} questions) |")


def cmd_report(args):
    out = Path(args.out)
    sft = Path(args.sft)
    world_dir = Path(args.world)
    needed = [out / "log.jsonl", sft / "log.jsonl", out / "mmlu.json", out / "samples.txt",
              world_dir / "world.json"]
    for need in needed:
        if not need.exists():
            raise FileNotFoundError(f"{need} is missing: run `make demo` (it runs every stage, "
                                    "then this report)")
    times = read_times(out / "timings.tsv")
    pcfg, pmodel, pn, psteps = run_summary(out)
    scfg, _, _, ssteps = run_summary(sft)
    bpb = runlog.read_curve(runlog.read_rows(out / "log.jsonl"), "val_bpb")
    sft_loss = runlog.read_curve(runlog.read_rows(sft / "log.jsonl"), "val_loss")
    (b0, bpb0), (b1, bpb1) = bpb[0], bpb[-1]
    (s0, sl0), (s1, sl1) = sft_loss[0], sft_loss[-1]
    acc = json.loads((out / "mmlu.json").read_text())["metrics"]["acc"]["micro"]
    cloze = None
    if (out / "cloze.json").exists():
        cloze = json.loads((out / "cloze.json").read_text())["metrics"]["acc"]["micro"]
    world = json.loads((world_dir / "world.json").read_text())
    replies = chat_replies((out / "samples.txt").read_text())
    if (sft / "loss.png").exists():
        common.write_atomic(out / "sft_loss.png", (sft / "loss.png").read_bytes())
    lines = [
        "# kiln demo: report card", "",
        f"`make demo` on {os.cpu_count()} CPU cores: an invented world of "
        f"{len(world['people'])} people (seed {world['seed']}), {world['documents']:,} pretraining "
        f"documents, {world['conversations']:,} chat conversations, {world['test_questions']} "
        "four-choice test questions whose facts the model only read in prose (never in question "
        "form).", "",
        "## What each stage did", "",
        "| stage | measure | before | after |", "|---|---|---:|---:|",
        f"| pretraining | val bits per byte | {bpb0:.3f} (step {b0}) | {bpb1:.3f} (step {b1}) |",
        f"| SFT | val loss on assistant tokens (nats) | {sl0:.3f} (step {s0}) | {sl1:.3f} "
        f"(step {s1}) |",
        mc_row("4-choice after SFT | accuracy, letter, chat, 0-shot", acc),
        *([mc_row("4-choice after pretraining | accuracy, cloze, 0-shot", cloze)] if cloze else []),
        "",
        "Letter: the reply's first token among A-D (eval_mmlu.py --chat). Cloze: the most likely "
        "answer text after \"Question: ...\\nAnswer:\" (--method cloze). The test facts were only "
        "ever stated in prose.", "",
        f"Tokens seen: pretraining {psteps * pcfg['total_batch_tokens']:,} ({psteps} steps), SFT "
        f"{ssteps * scfg['total_batch_tokens']:,} ({ssteps} steps of packed rows).", "",
        "## Configs", "",
        f"- model: preset `{pcfg['model']}` + overrides = {pn / 1e6:.2f}M parameters (vocab "
        f"{pmodel['vocab_size']}, {pmodel['n_layer']} layers, d_model {pmodel['d_model']}, "
        f"{pmodel['n_head']} heads, context {pmodel['max_seq_len']})",
        f"- pretraining (`config/demo.py` + the Makefile's DEMO_PRETRAIN_ARGS): {conf(pcfg)}",
        f"- SFT (`config/sft_demo.py` + DEMO_SFT_ARGS), from the pretrained checkpoint: "
        f"{conf(scfg)}",
        f"- full configs: `{out}/config.json`, `{sft}/config.json`", "",
        "## Time per stage", "", "| stage | seconds |", "|---|---:|",
        *[f"| {stage} | {sec:.1f} |" for stage, sec in times.items()],
        f"| **total** | **{sum(times.values()):.1f}** |", "",
        "## Sample answers (greedy, each question asked alone)", "",
        "| question | answer | expected |", "|---|---|---|",
        *[f"| {p['question']} | {cell(r)} | {p['expected']} |"
          for p, r in zip(world["prompts"], replies)], "",
        "## Loss curves", "", "Pretraining:", "", "![pretraining loss](loss.png)", "", "SFT:", "",
        "![SFT loss](sft_loss.png)", ""]
    write_text(out / "report.md", "\n".join(lines))
    print(f"wrote {out / 'report.md'}")


@dataclass
class WorldArgs:
    out: str | None = None  # the folder to write the corpus, chats and questions into (required)
    seed: int = 0
    people: int = 48
    docs: int = 8000        # pretraining documents


@dataclass
class ReportArgs:
    out: str | None = None  # the pretraining run folder, where report.md goes (required)
    sft: str = "out/sft_demo"    # the SFT run folder
    world: str = "data/demo_raw"  # the folder `demo.py world` wrote


COMMANDS = {"world": (WorldArgs, cmd_world), "report": (ReportArgs, cmd_report)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("--help", "-h"):
            print(__doc__.strip())
            raise SystemExit(0)
        raise ValueError("give a command first: python demo.py world --out DIR, or python demo.py "
                         "report --out RUN_DIR (--help shows more)")
    defaults, run = COMMANDS[argv[0]]
    args = config.parse_args(defaults(), argv[1:], doc=__doc__)
    if args.out is None:
        raise ValueError(f"--out is required: python demo.py {argv[0]} --out DIR")
    run(args)


if __name__ == "__main__":
    common.cli(main)
