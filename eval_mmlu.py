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
Scoring, the same log-likelihoods faster: the tokens a subject's prompts share (description and
few-shot examples: 84% of a 5-shot prompt) run once into KV caches and each question's own tokens
follow, batched; the last block's MLP runs only at the answer positions (generate.for_scoring).
"""
import ctypes
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoint
import common
import config
import generate
import mmlu

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


def continuations(item, method):
    """The four continuation strings: " A".." D", or cloze's " {choice text}"."""
    return [" " + (c if method == "cloze" else l) for l, c in zip(mmlu.LETTERS, item["choices"])]


def encode_all(tok, jobs, method, chat):
    """[(subject, item, shots)] -> [(context ids, four continuation id lists)], with lm-eval's
    continuation = whole[len(context):]. Every string in one encode_batch (Rust, all cores)."""
    if chat:
        conts = [tok.encode(l) for l in mmlu.LETTERS]
        return [(tok.render_prompt(mmlu.chat_messages(item, shots)), conts)
                for _, item, shots in jobs]
    texts = []
    for subject, item, shots in jobs:
        ctx = mmlu.build_prompt(subject, item, shots, method)
        texts += [ctx] + [ctx + c for c in continuations(item, method)]
    # as lm-eval encodes: the model's tokenizer with add_special_tokens=True, so a BOS only where
    # that tokenizer adds one itself (kiln's adds <|bos|>, as every training document starts)
    ids = tok.encode_hf(texts)
    out = []
    for i in range(0, len(ids), 5):
        ctx = ids[i]
        out.append((ctx, [whole[len(ctx):] for whole in ids[i + 1:i + 5]]))
    return out


def encode(tok, subject, item, shots, method, chat):
    """One question: (context ids, four continuation id lists)."""
    return encode_all(tok, [(subject, item, shots)], method, chat)[0]


def fit_all(tok, jobs, method, chat, max_len):
    """[(subject, item, shots)] -> [(context, continuations, shots dropped, truncated)], each prompt
    fitted into max_len: few-shot examples dropped, last first, until it fits; a 0-shot prompt
    that is still too long keeps its last tokens."""
    fitted = [None] * len(jobs)
    kept = [len(shots) for _, _, shots in jobs]
    todo = list(range(len(jobs)))
    while todo:  # one encode_batch per number of shots kept
        batch = [(*jobs[i][:2], jobs[i][2][:kept[i]]) for i in todo]
        retry = []
        for i, (ctx, conts) in zip(todo, encode_all(tok, batch, method, chat)):
            # the row fed to the model lacks the last token
            over = len(ctx) + max(map(len, conts)) - 1 - max_len
            dropped = len(jobs[i][2]) - kept[i]
            if over <= 0:
                fitted[i] = (ctx, conts, dropped, False)
            elif kept[i] == 0:
                fitted[i] = (ctx[over:], conts, dropped, True)
            else:
                kept[i] -= 1
                retry.append(i)
        todo = retry
    return fitted


def make_rows(q, ctx, conts):
    """Rows to run: (input ids, [(question, choice, first scored position, continuation ids),
    ...])."""
    # one forward pass scores all four: the next-token distribution after ctx
    if all(len(c) == 1 for c in conts):
        return [(ctx, [(q, i, len(ctx) - 1, c) for i, c in enumerate(conts)])]
    return [((ctx + c)[:-1], [(q, i, len(ctx) - 1, c)]) for i, c in enumerate(conts)]


def shared_len(rows):
    """How many leading tokens all rows have in common, short of the first scored position (whose
    logits must be computed). Compared as token ids, not strings: where BPE merges across the end
    of a shared string, that token is not shared."""
    first = rows[0][0]
    n = min(start for _, targets in rows for _, _, start, _ in targets)
    for ids, _ in rows[1:]:
        if ids[:n] != first[:n]:
            n = next(i for i in range(n) if ids[i] != first[i])
    return n


def score_batch(net, batch, P, lls):
    """Add the log-probs of one batch of rows to lls {(question, choice): log-prob}; net (a
    generate.for_scoring copy) holds the rows' first P tokens in its caches. Rows padded on the
    right (causal attention: padding never changes an earlier position)."""
    device = net.embed_tokens.weight.device
    idx = torch.zeros(len(batch), max(len(ids) for ids, _ in batch) - P, dtype=torch.long)
    for r, (ids, _) in enumerate(batch):
        idx[r, :len(ids) - P] = torch.tensor(ids[P:])                       # (B, T - P)
    # ((row, column), key, token) per scored token: the logits at a position predict the next token
    scored = [((r, start - P + j), (q, c), t) for r, (_, targets) in enumerate(batch)
              for q, c, start, cont in targets for j, t in enumerate(cont)]
    where = sorted({pos for pos, _, _ in scored})      # each position once (four letters: one)
    slot = {pos: i for i, pos in enumerate(where)}
    rows, cols = torch.tensor(where, device=device).T                       # (N,) each
    generate.score_at(net, rows, cols)
    h = net.hidden(idx.to(device), start=P)[rows, cols]                      # (N, d_model)
    # only the scored positions, never (B, T, V)
    logits = net.lm_head(h).float()                                          # (N, V)
    lse = logits.logsumexp(-1)                                               # (N,)
    ii = torch.tensor([slot[pos] for pos, _, _ in scored], device=device)   # (M,)
    tt = torch.tensor([t for _, _, t in scored], device=device)              # (M,)
    for (_, key, _), v in zip(scored, (logits[ii, tt] - lse[ii]).tolist()):
        lls[key] = lls.get(key, 0.0) + v


def batches(lengths, batch_size, overhead=32):
    """Cut rows sorted by length, longest first, into runs of at most batch_size rows -> [(start,
    end)], minimizing the tokens run (each row padded to its batch's first) plus `overhead` tokens
    per batch (a forward pass's fixed cost, ~32 tokens' time on CPU): a long row does not pad 15
    short ones. Dynamic programming over where each batch ends, O(rows x batch_size)."""
    cost = [0] + [math.inf] * len(lengths)   # cost[end]: the best cut of rows 0..end-1
    cut = [0] * (len(lengths) + 1)           # where that cut's last batch starts
    for end in range(1, len(lengths) + 1):
        for start in range(max(0, end - batch_size), end):
            c = cost[start] + lengths[start] * (end - start) + overhead
            if c < cost[end]:
                cost[end] = c
                cut[end] = start
    spans = []
    end = len(lengths)
    while end:
        spans.append((cut[end], end))
        end = cut[end]
    return spans[::-1]


@torch.no_grad()
def score_rows(model, groups, batch_size):
    """{(question, choice): summed log-prob of its continuation} for groups of rows. A group's
    shared prefix (a subject's description and few-shot examples) runs once into KV caches,
    copied to every row of the batch (generate.prefill_shared); then its rows' own tokens, sorted
    by length, at most batch_size rows per forward pass."""
    device = model.lm_head.weight.device
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    longest = max(len(ids) for rows in groups for ids, _ in rows)
    net = generate.for_scoring(model, batch_size, longest, torch.bfloat16 if cuda else None)
    # a GPU's forward pass costs about the same for thousands more tokens: keep its batches full
    overhead = 4096 if cuda else 32
    plan = []   # (shared prefix length, rows longest first, batches)
    for rows in groups:
        P = shared_len(rows) if len(rows) > 1 else 0
        rows = sorted(rows, key=lambda row: -len(row[0]))
        plan.append((P, rows, batches([len(ids) - P for ids, _ in rows], batch_size, overhead)))
    # the group with the longest row first: running out of memory shows at once
    plan.sort(key=lambda p: -len(p[1][0][0]))
    lls = {}
    with amp, tqdm(total=sum(len(p[2]) for p in plan), desc="mmlu", unit="batch",
                   mininterval=2) as bar:
        for P, rows, spans in plan:
            if P:
                generate.score_at(net, (), ())   # no position of the prefix is scored
                generate.prefill_shared(net, torch.tensor(rows[0][0][:P], device=device))
            for start, end in spans:
                score_batch(net, rows[start:end], P, lls)
                bar.update()
    return lls


def evaluate(model, tok, tests, devs, shots=0, method="letter", chat=False, batch_size=16):
    """Score every test question -> dict(questions=[per-question records], dropped_shots,
    truncated)."""
    jobs = []
    questions = []
    for subject, items in tests.items():
        if len(devs.get(subject, [])) < shots:
            raise ValueError(f"MMLU subject {subject} has {len(devs.get(subject, []))} dev "
                             f"questions, fewer than --shots {shots}; lower --shots")
        for i, item in enumerate(items):
            jobs.append((subject, item, devs.get(subject, [])[:shots]))
            questions.append({"subject": subject, "index": i, "gold": item["answer"]})
            if method == "cloze":
                questions[-1]["bytes"] = [len((" " + c).encode()) for c in item["choices"]]
    fitted = fit_all(tok, jobs, method, chat, model.config.max_seq_len)
    # the rows of a subject's questions with as many few-shot examples kept share a prefix
    groups = {}
    for q, ((subject, _, _), (ctx, conts, dropped, truncated)) in enumerate(zip(jobs, fitted)):
        groups.setdefault((subject, dropped, truncated), []).extend(make_rows(q, ctx, conts))
    lls = score_rows(model, list(groups.values()), batch_size)

    def argmax(xs):  # the first of ties, like numpy's argmax
        return mmlu.LETTERS[max(range(4), key=xs.__getitem__)]
    for q, rec in enumerate(questions):
        rec["loglik"] = [lls[q, c] for c in range(4)]
        rec["pred"] = argmax(rec["loglik"])
        if method == "cloze":
            rec["pred_per_byte"] = argmax([ll / n for ll, n in zip(rec["loglik"], rec["bytes"])])
    return {"questions": questions, "dropped_shots": sum(f[2] for f in fitted),
            "truncated": sum(f[3] for f in fitted)}


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
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size} must be at least 1")


def keep_freed_memory():
    """glibc's malloc gives large freed blocks back to the OS at once and maps them again at the
    next forward pass: the page faults cost ~0.4 s of system time, ~8% of a 0-shot run of the demo
    model. Keep them instead (the process's memory stays at its peak). A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: return free heap above 1 GiB only
    libc.mallopt(-3, 1 << 25)   # M_MMAP_THRESHOLD: heap, not mmap, up to 32 MiB (glibc's most)


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
    keep_freed_memory()   # the process's own allocator setting: not for callers of main()
    common.cli(main)   # bad input exits inside, with status 2
    # Done and written: skip the interpreter's teardown of torch's modules, ~0.45 s of CPU (10% of
    # a small model's whole 0-shot run; bench/bench_lm_eval.py times whole processes).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
