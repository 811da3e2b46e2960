"""MMLU (57 subjects, 4-way multiple choice), scored the way lm-evaluation-harness scores it.

    python eval_mmlu.py                          # the newest SFT (else pretrain) checkpoint in out/
    python eval_mmlu.py --ckpt out/pretrain_1b --shots 5 --out mmlu.json   # one GPU: bf16, batched
    python eval_mmlu.py --ckpt hf/TinyLlama --method cloze --subjects anatomy   # a Hugging Face dir
    python eval_mmlu.py --ckpt out/sft --chat    # an SFT model, the question as a user turn
    python eval_mmlu.py --ckpt out/demo --limit 5 --device cpu               # CPU smoke run

letter (default): lm-eval's `mmlu` task, verbatim. The context is
    "The following are multiple choice questions (with answers) about {subject, _ -> space}.\\n\\n"
    + per example, the first k dev questions:
      "{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {gold}"
      and a blank line "\\n\\n"
    + "{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:"
  and the prediction is the largest log-likelihood of the continuations " A", " B", " C", " D".
cloze: lm-eval's `mmlu_continuation`
  ("The following are questions (with answers) about {subject}.\\n\\n",
  "Question: {question.strip()}\\nAnswer:") with each choice " {text}" as the continuation;
  reports acc (sum of log-probs) and acc_per_byte (divided by the UTF-8 bytes of " {text}"), which
  shows signal in small models.
--chat: each question is the user turn
  "{question.strip()}\\nA. {A}\\n...\\nD. {D}\\nAnswer with the letter.", rendered by
  tokenizer.render_prompt with the model's own chat template (no system turn, ends with its
  generation prompt, kiln's <|assistant|>); few-shot examples are earlier user/assistant turns whose
  reply is the bare letter. Scored: tokens "A".."D" (no space) as the reply.
Tokens as lm-eval makes them by default: encode = the model's tokenizer as transformers runs it with
add_special_tokens=True, continuation = encode(context + continuation)[len(encode(context)):]. So
the context starts with a BOS exactly when the model's tokenizer adds one itself: kiln's does
(<|bos|>, as every training document starts), many Hugging Face models' do not. A prompt longer
than the model's max_seq_len drops few-shot examples, last first (counted); a 0-shot prompt that is
still too long keeps its last tokens (counted). Accuracy: micro over questions (lm-eval's group
score) and macro over subjects, with a 95% Wilson score interval; chance is 25%.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoint
import common
import config
import mmlu

LETTERS = "ABCD"
# The MMLU paper's subject -> category map, as lm-eval's mmlu_{stem,humanities,social_sciences,
# other} groups.
CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry "
            "college_computer_science college_mathematics college_physics computer_security "
            "conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
            "high_school_chemistry high_school_computer_science high_school_mathematics "
            "high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history "
                  "high_school_world_history international_law jurisprudence logical_fallacies "
                  "moral_disputes moral_scenarios philosophy prehistory professional_law "
                  "world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics "
                       "high_school_psychology human_sexuality professional_psychology "
                       "public_relations security_studies sociology us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging "
             "management marketing medical_genetics miscellaneous nutrition "
             "professional_accounting professional_medicine virology",
}
CATEGORY = {s: cat for cat, names in CATEGORIES.items() for s in names.split()}


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


def encode(tok, subject, item, shots, method, chat):
    """(context ids, four continuation id lists), with lm-eval's continuation =
    whole[len(context):]."""
    if chat:
        return tok.render_prompt(chat_messages(item, shots)), [tok.encode(l) for l in LETTERS]
    ctx = build_prompt(subject, item, shots, method)
    conts = [" " + (c if method == "cloze" else l) for l, c in zip(LETTERS, item["choices"])]
    # as lm-eval encodes: the model's tokenizer with add_special_tokens=True, so a BOS only where
    # that tokenizer adds one itself (kiln's adds <|bos|>, as every training document starts)
    ids = tok.encode_hf([ctx] + [ctx + c for c in conts])
    return ids[0], [whole[len(ids[0]):] for whole in ids[1:]]


def fit(tok, subject, item, shots, method, chat, max_len):
    """Drop few-shot examples until the prompt fits -> (context, continuations, shots dropped,
    truncated)."""
    for k in range(len(shots), -1, -1):
        ctx, conts = encode(tok, subject, item, shots[:k], method, chat)
        # the row fed to the model lacks the last token
        over = len(ctx) + max(map(len, conts)) - 1 - max_len
        if over <= 0:
            return ctx, conts, len(shots) - k, False
    return ctx[over:], conts, len(shots), True


def make_rows(q, ctx, conts):
    """Rows to run: (input ids, [(question, choice, first scored position, continuation ids),
    ...])."""
    # one forward pass scores all four: the next-token distribution after ctx
    if all(len(c) == 1 for c in conts):
        return [(ctx, [(q, i, len(ctx) - 1, c) for i, c in enumerate(conts)])]
    return [((ctx + c)[:-1], [(q, i, len(ctx) - 1, c)]) for i, c in enumerate(conts)]


@torch.no_grad()
def score_rows(model, rows, batch_size):
    """{(question, choice): summed log-prob of its continuation}. Rows sorted by length and padded
    on the right (causal attention: padding never changes an earlier position), one forward pass
    per batch."""
    lls = {}
    device = next(model.parameters()).device
    # longest first: running out of memory shows at once
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for b in tqdm(range(0, len(order), batch_size), desc="mmlu", unit="batch", mininterval=2):
        batch = [rows[i] for i in order[b:b + batch_size]]
        idx = torch.zeros(len(batch), len(batch[0][0]), dtype=torch.long)       # (B, T)
        for r, (ids, _) in enumerate(batch):
            idx[r, :len(ids)] = torch.tensor(ids)
        # (row, position, token, key) per scored token: the logits at position p predict token p + 1
        rr, pp, tt, keys = zip(*[(r, start + j, t, (q, c)) for r, (_, targets) in enumerate(batch)
                                 for q, c, start, cont in targets for j, t in enumerate(cont)])
        with amp:
            h = model.hidden(idx.to(device))                                     # (B, T, d_model)
            # only the scored positions, never (B, T, V)
            logits = model.lm_head(h[list(rr), list(pp)]).float()                # (N, V)
        tt = torch.tensor(tt, device=logits.device)                              # (N,)
        lp = logits.gather(1, tt[:, None])[:, 0] - logits.logsumexp(-1)          # (N,)
        for key, v in zip(keys, lp.tolist()):
            lls[key] = lls.get(key, 0.0) + v
    return lls


def evaluate(model, tok, tests, devs, shots=0, method="letter", chat=False, batch_size=16):
    """Score every test question -> dict(questions=[per-question records], dropped_shots,
    truncated)."""
    questions = []
    rows = []
    dropped = 0
    truncated = 0
    for subject, items in tests.items():
        if len(devs.get(subject, [])) < shots:
            raise ValueError(f"MMLU subject {subject} has {len(devs.get(subject, []))} dev "
                             f"questions, fewer than --shots {shots}; lower --shots")
        for i, item in enumerate(items):
            ctx, conts, d, t = fit(tok, subject, item, devs.get(subject, [])[:shots], method, chat,
                                   model.config.max_seq_len)
            rows += make_rows(len(questions), ctx, conts)
            dropped += d
            truncated += t
            questions.append({"subject": subject, "index": i, "gold": item["answer"]})
            if method == "cloze":
                questions[-1]["bytes"] = [len((" " + c).encode()) for c in item["choices"]]
    lls = score_rows(model, rows, batch_size)

    def argmax(xs):  # the first of ties, like numpy's argmax
        return LETTERS[max(range(4), key=xs.__getitem__)]
    for q, rec in enumerate(questions):
        rec["loglik"] = [lls[q, c] for c in range(4)]
        rec["pred"] = argmax(rec["loglik"])
        if method == "cloze":
            rec["pred_per_byte"] = argmax([ll / n for ll, n in zip(rec["loglik"], rec["bytes"])])
    return {"questions": questions, "dropped_shots": dropped, "truncated": truncated}


def wilson(k, n, z=1.96):
    """95% Wilson score interval for k successes out of n (sensible near 0, 1 and for small n)."""
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [mid - half, mid + half]


def summarize(questions, pred="pred"):
    """Accuracy of one prediction field: micro (over questions), macro (over subjects),
    categories, subjects."""
    def acc(recs):
        k = sum(r[pred] == r["gold"] for r in recs)
        return {"acc": k / len(recs), "n": len(recs), "ci95": wilson(k, len(recs))}
    names = dict.fromkeys(r["subject"] for r in questions)  # in order of appearance
    subjects = {s: acc([r for r in questions if r["subject"] == s]) for s in names}
    cats = {c: acc(rs) for c in CATEGORIES
            if (rs := [r for r in questions if CATEGORY.get(r["subject"]) == c])}
    macro = sum(s["acc"] for s in subjects.values()) / len(subjects)
    return {"micro": acc(questions), "macro": macro, "categories": cats, "subjects": subjects}


def markdown(metrics):
    """One table, a column pair (accuracy, 95% CI) per metric."""
    def row(name, n, cells):
        return f"| {name} | {n} | " + " | ".join(cells) + " |"

    def cell(a):
        return f"{100 * a['acc']:.2f} | {100 * a['ci95'][0]:.1f}-{100 * a['ci95'][1]:.1f}"
    first = next(iter(metrics.values()))
    lines = [row("group", "n", [f"{m} % | 95% CI" for m in metrics]),
             "|---|---:|" + "---:|---|" * len(metrics),
             row("**all (micro)**", first["micro"]["n"],
                 [cell(m["micro"]) for m in metrics.values()]),
             row("all (macro over subjects)", f"{len(first['subjects'])} subjects",
                 [f"{100 * m['macro']:.2f} | " for m in metrics.values()])]
    for group in ("categories", "subjects"):
        lines += [row(g, a["n"], [cell(m[group][g]) for m in metrics.values()])
                  for g, a in first[group].items()]
    return "\n".join(lines) + "\n\nchance: 25.00% (4 choices)"


@dataclass
class Args:
    ckpt: str | None = None      # checkpoint, run or Hugging Face folder (default: the newest)
    data: str | None = None      # hub or CSV folder (default: data/mmlu, ../shared/data/mmlu, hub)
    shots: int = 0               # few-shot examples from dev (0..5)
    subjects: str | None = None  # comma-separated subjects (default: all)
    method: str = "letter"       # "letter" | "cloze"
    chat: bool = False           # the question as a user turn, the letter as the reply
    limit: int | None = None     # the first N test questions per subject
    batch_size: int = 16
    device: str = "auto"
    out: str | None = None       # write everything, per question too, as JSON


def check_args(args):
    """Refuse options that cannot work together, before anything is loaded."""
    if not 0 <= args.shots <= 5:
        raise ValueError(f"--shots {args.shots} is out of range: MMLU has 5 dev questions per "
                         "subject")
    if args.method not in ("letter", "cloze"):
        raise ValueError(f"--method {args.method!r} is unknown: use letter or cloze")
    if args.chat and args.method == "cloze":
        raise ValueError("--chat scores letters; drop --method cloze or --chat")


def main(argv=None):
    args = config.parse_args(Args(), argv, doc=__doc__)
    check_args(args)
    device = common.pick_device(args.device)
    source = str(args.data or mmlu.default_mmlu_dir() or "hub")
    # load_mmlu's errors are clear: a missing subject, a bad row
    tests = mmlu.load_mmlu(source, "test", args.subjects)
    tests = {s: items[:args.limit] for s, items in tests.items()}
    if not any(tests.values()):
        raise ValueError(f"no MMLU test questions in {source} for these subjects; check --data and "
                         "--limit")
    devs = mmlu.load_mmlu(source, "dev", list(tests)) if args.shots else {}
    ckpt = checkpoint.find_checkpoint(args.ckpt)
    model, tok, meta = checkpoint.load_model(ckpt, device=device)
    if tok is None:
        raise ValueError(f"{ckpt} has no tokenizer.json; copy the tokenizer the model was trained "
                         "with into it")
    res = evaluate(model, tok, tests, devs, shots=args.shots, method=args.method, chat=args.chat,
                   batch_size=args.batch_size)
    preds = {"acc": "pred"}
    if args.method == "cloze":
        preds["acc_per_byte"] = "pred_per_byte"
    metrics = {m: summarize(res["questions"], key) for m, key in preds.items()}
    print(f"MMLU {args.method}{' chat' * args.chat}, {args.shots}-shot, {ckpt} (step "
          f"{meta.get('step')}), data {source}: {len(res['questions'])} questions, "
          f"{res['dropped_shots']} few-shot examples dropped and {res['truncated']} prompts "
          f"truncated to fit max_seq_len {model.config.max_seq_len}\n")
    print(markdown(metrics))
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("ckpt", "data", "out")}
        settings["device"] = str(device)
        common.write_json(args.out, {"ckpt": str(ckpt), "step": meta.get("step"), "data": source,
                                     "chance": 0.25, **settings, "metrics": metrics, **res})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    common.cli(main)
