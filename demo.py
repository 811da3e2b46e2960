"""The whole pipeline on a built-in corpus: an invented world, generated from a seed, nothing
downloaded.

    python demo.py world --out data/demo_raw [--seed 0] [--people 64] [--docs 8000]
    python demo.py world --out data/demo_raw --people 64 --docs 8000 --mc_facts 4 --mc_copies 3
                                             # what `make demo` runs
    python demo.py report --out out/demo     # after `make demo` ran the stages: out/demo/report.md
    python demo.py world --help              # each command's options

`make demo` runs every stage (world -> tokenizer -> shards -> pretrain -> SFT -> multiple choice ->
chat) and ends with the report card. The world (demo_world.py) is a few dozen people with six
askable facts each, dealt into three kinds: asked as 4-choice questions in training, stated only in
chat answers, stated only in prose. The report card gives letter accuracy on each kind with a 95%
interval: the last two measure whether the answer format carries over to facts never asked that
way (issue 16); the first is memorisation, a check.

world writes into --out:
    pretrain.jsonl           {"text": ...} prose documents for bpe.py and data.py
    mc.jsonl                 {"text": ...} the mc facts' 4-choice questions in eval_mmlu.py's
                             plain-text layout, answered (mixed into pretraining by make demo)
    chat.jsonl               {"messages": [...]} conversations for data.py --sft
    mmlu/{dev,test}/demo_{mc,chat,prose}_{dev,test}.csv   each kind's test, in the MMLU layout
    prompts.txt              open questions about chat and prose facts, for sample.py
"""
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint
import common
import config
import demo_world
import llm
import runlog

SUBJECTS = {kind: f"demo_{kind}" for kind in demo_world.KINDS}  # the test of each kind


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    common.write_atomic(path, text.encode("utf-8"))


def csv_text(rows):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([q, *choices, ans] for q, choices, ans in rows)
    return buf.getvalue()


def cmd_world(args):
    n_names = sum(len(v) for v in demo_world.FIRST.values()) * len(demo_world.LAST)
    if not 4 <= args.people <= n_names:
        raise ValueError(f"--people {args.people} is out of range: the world needs 4 to {n_names} "
                         "people")
    if args.docs < 10:
        raise ValueError(f"--docs {args.docs} is too few: give at least 10 pretraining documents")
    people, docs, chats, mc_docs, tests, dev, prompts = demo_world.make_world(
        args.seed, args.people, args.docs, args.mc_facts, args.mc_copies, args.chat_copies)
    out = Path(args.out)
    write_text(out / "pretrain.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    write_text(out / "mc.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in mc_docs))
    write_text(out / "chat.jsonl", "".join(json.dumps({"messages": c}) + "\n" for c in chats))
    for kind, subject in SUBJECTS.items():
        write_text(out / "mmlu" / "dev" / f"{subject}_dev.csv", csv_text(dev))
        write_text(out / "mmlu" / "test" / f"{subject}_test.csv", csv_text(tests[kind]))
    write_text(out / "prompts.txt", "".join(p["question"] + "\n" for p in prompts))
    facts = [{k: v for k, v in p.items() if k not in ("first", "p", "pp")} for p in people]
    world = {"seed": args.seed, "people": facts, "prompts": prompts, "documents": len(docs),
             "mc_documents": len(mc_docs), "conversations": len(chats),
             "test_questions": {kind: len(rows) for kind, rows in tests.items()}}
    # last: its presence means "complete"
    write_text(out / "world.json", json.dumps(world, indent=1) + "\n")
    n_chars = sum(len(d) for d in docs)
    print(f"world: {len(people)} people, {len(docs)} documents ({n_chars / 1e6:.2f} M characters), "
          f"{len(mc_docs)} 4-choice documents, {len(chats)} conversations, test questions "
          f"{world['test_questions']} -> {out}")


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
    """A run config in one line: steps, batch, optimizer, learning-rate schedule."""
    muon = c.get("optimizer") == "muon"
    optimizer = f"Muon (muon_lr {c['muon_lr']:g}) + AdamW" if muon else "AdamW"
    return (f"{c['max_iters']} steps of {c['total_batch_tokens']:,} tokens ({c['batch_size']} x "
            f"{c['block_size']}); {optimizer}, lr {c['learning_rate']:g} -> {c['min_lr']:g}, "
            f"warmup {c['warmup_iters']}, {c['schedule']}, weight decay {c['weight_decay']:g}")


def cell(text):
    """text as one line of a markdown table cell."""
    return " ".join(text.replace("|", "\\|").split())


def mc_row(stage, measure, a):
    """A table row of 4-choice accuracy with its 95% interval (Wilson, eval_mmlu.py)."""
    return (f"| {stage} | {measure} | 25% (chance) | **{100 * a['acc']:.1f}%** (95% CI "
            f"{100 * a['ci95'][0]:.0f}-{100 * a['ci95'][1]:.0f}%, {a['n']} questions) |")


KIND_NAMES = {"chat": "facts only in chat answers", "prose": "facts only in prose",
              "mc": "facts asked as 4-choice in training (a check)"}


def accuracy_rows(out):
    """The 4-choice rows: letter after SFT and cloze after pretraining, per kind of fact."""
    rows = []
    for name, stage, measure in (("mmlu.json", "after SFT", "letter, chat, 0-shot"),
                                 ("mmlu_mid.json", "after mid", "letter, plain text, 0-shot"),
                                 ("cloze.json", "after pretraining", "cloze, 0-shot")):
        if (out / name).exists():
            subjects = json.loads((out / name).read_text())["metrics"]["acc"]["subjects"]
            rows += [mc_row(stage, f"{measure}: {name}", subjects[SUBJECTS[kind]])
                     for kind, name in KIND_NAMES.items() if SUBJECTS[kind] in subjects]
    return rows


def stage_rows(out, sft, mid):
    """The loss rows: pretraining's val bits per byte, mid's (when it ran) and SFT's val loss."""
    rows = []
    for run, stage, key, measure in ((out, "pretraining", "val_bpb", "val bits per byte"),
                                     (mid, "mid (4-choice text)", "val_bpb", "val bits per byte"),
                                     (sft, "SFT", "val_loss", "val loss on assistant tokens")):
        if run and (run / "log.jsonl").exists():
            data_dir = json.loads((run / "config.json").read_text())["data_dir"]
            if "," in data_dir:  # a mixture: the first source's curve (the world's prose)
                key += "/" + Path(data_dir.split(",")[0].rsplit(":", 1)[0]).name
                measure += f" ({Path(key).name})"
            curve = runlog.read_curve(runlog.read_rows(run / "log.jsonl"), key)
            (s0, v0), (s1, v1) = curve[0], curve[-1]
            rows.append(f"| {stage} | {measure} | {v0:.3f} (step {s0}) | {v1:.3f} (step {s1}) |")
    return rows


def config_lines(out, sft, mid):
    pcfg, pmodel, pn, psteps = run_summary(out)
    runs = [(out, "pretraining", "config/demo.py + DEMO_PRETRAIN_ARGS")]
    if mid and (mid / "config.json").exists():
        runs.append((mid, "mid", "config/mid_demo.py + DEMO_MID_ARGS"))
    runs.append((sft, "SFT", "config/sft_demo.py + DEMO_SFT_ARGS"))
    lines = [f"- model: preset `{pcfg['model']}` + overrides = {pn / 1e6:.2f}M parameters (vocab "
             f"{pmodel['vocab_size']}, {pmodel['n_layer']} layers, d_model {pmodel['d_model']}, "
             f"{pmodel['n_head']} heads, context {pmodel['max_seq_len']})"]
    seen = []
    for run, stage, where in runs:
        cfg, _, _, steps = run_summary(run)
        lines.append(f"- {stage} (`{where}`): {conf(cfg)}")
        seen.append(f"{stage} {steps * cfg['total_batch_tokens']:,} ({steps} steps)")
    lines.append("- tokens seen: " + ", ".join(seen))
    return lines


def cmd_report(args):
    out = Path(args.out)
    sft = Path(args.sft)
    mid = Path(args.mid) if args.mid else None
    world_dir = Path(args.world)
    needed = [out / "log.jsonl", sft / "log.jsonl", out / "mmlu.json", out / "samples.txt",
              world_dir / "world.json"]
    for need in needed:
        if not need.exists():
            raise FileNotFoundError(f"{need} is missing: run `make demo` (it runs every stage, "
                                    "then this report)")
    times = read_times(out / "timings.tsv")
    world = json.loads((world_dir / "world.json").read_text())
    replies = chat_replies((out / "samples.txt").read_text())
    if (sft / "loss.png").exists():
        common.write_atomic(out / "sft_loss.png", (sft / "loss.png").read_bytes())
    n_test = world["test_questions"]
    lines = [
        "# kiln demo: report card", "",
        f"`make demo` on {os.cpu_count()} CPU cores: an invented world of "
        f"{len(world['people'])} people (seed {world['seed']}), {world['documents']:,} pretraining "
        f"documents, {world['mc_documents']:,} documents of 4-choice questions, "
        f"{world['conversations']:,} chat conversations. Each person's six askable facts come in "
        f"three kinds: facts stated only in chat answers (SFT; {n_test['chat']} test questions), "
        f"facts stated only in the pretraining prose ({n_test['prose']}), and facts also asked as "
        f"4-choice questions in training ({n_test['mc']}). Does the answer format learned on the "
        "last kind carry over to the first two?", "",
        "## What each stage did", "",
        "| stage | measure | before | after |", "|---|---|---:|---:|",
        *stage_rows(out, sft, mid), *accuracy_rows(out), "",
        "Letter: the reply's first token among A-D (eval_mmlu.py --chat), or \" A\"..\" D\" "
        "after lm-eval's plain-text prompt. Cloze: the most likely answer text after "
        "\"Question: ...\\nAnswer:\" (--method cloze); chat-only facts were never in the "
        "pretraining text, so their cloze score is chance by design.", "",
        "## Configs", "", *config_lines(out, sft, mid),
        f"- full configs: `{out}/config.json`, `{sft}/config.json`", "",
        "## Time per stage", "", "| stage | seconds |", "|---|---:|",
        *[f"| {stage} | {sec:.1f} |" for stage, sec in times.items()],
        f"| **total** | **{sum(times.values()):.1f}** |", "",
        "## Sample answers (greedy, each question asked alone)", "",
        "| question | kind | answer | expected |", "|---|---|---|---|",
        *[f"| {p['question']} | {p['kind']} | {cell(r)} | {p['expected']} |"
          for p, r in zip(world["prompts"], replies)], "",
        "## Loss curves", "", "Pretraining:", "", "![pretraining loss](loss.png)", "", "SFT:", "",
        "![SFT loss](sft_loss.png)", ""]
    write_text(out / "report.md", "\n".join(lines))
    print(f"wrote {out / 'report.md'}")


@dataclass
class WorldArgs:
    out: str | None = None  # the folder to write the corpus, chats and questions into (required)
    seed: int = 0
    people: int = 64
    docs: int = 8000        # pretraining documents
    mc_facts: int = 2       # of each person's six askable facts, asked as 4-choice in training
    mc_copies: int = 2      # each mc fact's 4-choice question, this many times in training
    chat_copies: int = 3    # each chat fact's open question, this many times in the chats


@dataclass
class ReportArgs:
    out: str | None = None  # the pretraining run folder, where report.md goes (required)
    sft: str = "out/sft_demo"    # the SFT run folder
    mid: str = ""                # the mid run folder, when the demo ran one
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
