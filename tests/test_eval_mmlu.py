"""eval_mmlu.py: lm-eval's prompt strings, scores against direct log-softmax, a model that always
says C, bad CSVs."""
import csv
import itertools
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import bpe
import checkpoint
import eval_mmlu
import mmlu
import llm

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "ABCD"

# A small MMLU-layout folder: (question, A, B, C, D, answer) rows. Real subject names, so categories
# apply.
DEV = [(f"  What is {i} plus {i}? ", str(2 * i), str(i), "zero", "none of these", "A")
       for i in range(1, 6)]
TEST = {
    "anatomy": [("Which organ pumps blood?", "lung", "liver", "heart", "skin", "C"),
                ("How many bones, roughly, in an adult?", "206", "12", "1,000", "3", "A"),
                ("The femur is in the", "arm", "leg", "head", "chest", "B"),
                ("Where is the \"tibia\"?", "leg, lower", "arm", "skull", "hand", "A"),
                ("Which carries oxygen?", "platelets", "plasma", "red cells", "bile", "C")],
    "astronomy": [("Closest star to Earth?", "Sirius", "Vega", "the Sun", "Polaris", "C"),
                  ("Planets in the solar system?", "7", "8", "9", "10", "B"),
                  ("What orbits the Earth?", "the Moon", "Mars", "the Sun", "Venus", "A")],
    "world_religions": [("Which city is holy in three religions?", "Paris", "Oslo", "Lima",
                         "Jerusalem", "D"),
                        ("A long question " + "about many things " * 12 + "?", "yes", "no",
                         "maybe", "never", "C")],
}


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def as_items(rows):
    return [{"question": r[0], "choices": list(r[1:5]), "answer": r[5]} for r in rows]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The MMLU folder, a tiny BPE trained on MMLU-like text, and a random tiny model saved as a
    checkpoint."""
    tmp = tmp_path_factory.mktemp("mmlu")
    for subject, rows in TEST.items():
        write_csv(tmp / "mmlu" / "test" / f"{subject}_test.csv", rows)
        write_csv(tmp / "mmlu" / "dev" / f"{subject}_dev.csv", DEV)
    corpus = tmp / "corpus.txt"
    text = [f"{' '.join(r[:5])}\nAnswer: {r[5]}\nAnswer: {L}. {L} is right.\n"
            for rows in TEST.values() for r in rows + DEV for L in LETTERS]
    corpus.write_text("".join(text) * 5)
    tok = bpe.train([str(corpus)], 400, tmp / "tok")
    torch.manual_seed(0)
    model = llm.LLM(llm.model_config("tiny", vocab_size=tok.vocab_size, max_seq_len=1024))
    with torch.no_grad():
        # peaked, not near-uniform, predictions: a wrong position would show
        model.lm_head.weight.mul_(30)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = checkpoint.save_checkpoint(tmp / "run", 1, model, opt, {}, {}, tok)
    model, tok, _ = checkpoint.load_model(ckpt)
    tests = {s: as_items(rows) for s, rows in TEST.items()}
    devs = {s: as_items(DEV) for s in TEST}
    return dict(tmp=tmp, data=tmp / "mmlu", tok=tok, model=model, ckpt=ckpt, tests=tests, devs=devs)


def test_prompt_strings_match_lm_eval():
    item = as_items(TEST["anatomy"])[3]
    zero = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
            "Where is the \"tibia\"?\nA. leg, lower\nB. arm\nC. skull\nD. hand\nAnswer:")
    assert mmlu.build_prompt("anatomy", item, []) == zero
    shots = "".join(f"What is {i} plus {i}?\nA. {2 * i}\nB. {i}\nC. zero\nD. none of these\n"
                    "Answer: A\n\n" for i in range(1, 6))
    five = zero.replace("about anatomy.\n\n", "about anatomy.\n\n" + shots)
    assert mmlu.build_prompt("anatomy", item, as_items(DEV)) == five
    assert mmlu.build_prompt("world_religions", item, []).startswith(
        "The following are multiple choice questions (with answers) about world religions.\n\n"
        "Where")
    cloze = ("The following are questions (with answers) about anatomy.\n\n"
             "Question: What is 1 plus 1?\nAnswer: 2\n\nQuestion: Where is the \"tibia\"?\nAnswer:")
    assert mmlu.build_prompt("anatomy", item, as_items(DEV)[:1], "cloze") == cloze


def direct_logprobs(model, ids):
    """log_softmax over one unbatched, unpadded sequence: (T, V), float64."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].double(), dim=-1)


@pytest.mark.parametrize("shots", [0, 5])
def test_letter_scores_equal_direct_log_softmax(setup, shots):
    tok, model = setup["tok"], setup["model"]
    letter_ids = [tok.encode(" " + L) for L in LETTERS]
    assert all(len(t) == 1 for t in letter_ids), \
        "the test tokenizer must have ' A'..' D' as single tokens"
    res = eval_mmlu.evaluate(model, tok, setup["tests"], setup["devs"], shots=shots, batch_size=3)
    assert res["dropped_shots"] == 0 and res["truncated"] == 0
    recs = iter(res["questions"])
    for subject, rows in TEST.items():
        for i, r in enumerate(rows):
            head = ("The following are multiple choice questions (with answers) about "
                    f"{subject.replace('_', ' ')}.\n\n")
            examples = "".join(f"{d[0].strip()}\nA. {d[1]}\nB. {d[2]}\nC. {d[3]}\nD. {d[4]}\n"
                               f"Answer: {d[5]}\n\n" for d in DEV[:shots])
            ctx = head + examples + (f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\n"
                                     f"D. {r[4]}\nAnswer:")
            lp = direct_logprobs(model, [tok.bos_id] + tok.encode(ctx))[-1]
            want = [lp[t[0]].item() for t in letter_ids]
            rec = next(recs)
            assert (rec["subject"], rec["index"], rec["gold"]) == (subject, i, r[5])
            assert rec["loglik"] == pytest.approx(want, abs=1e-4)
            assert rec["pred"] == LETTERS[max(range(4), key=want.__getitem__)]


def letter_rows(tok, subject, items, shots):
    return [row for q, item in enumerate(items)
            for row in eval_mmlu.make_rows(q, *eval_mmlu.encode(tok, subject, item, shots,
                                                                "letter", False))]


def test_a_subjects_rows_share_their_common_tokens(setup):
    """5-shot: every anatomy prompt starts with the description and five examples; the rows share
    exactly the tokens they have in common (os.path.commonprefix over the id lists), which the
    scorer runs once (generate.prefill_shared)."""
    tok = setup["tok"]
    items = setup["tests"]["anatomy"]
    rows = letter_rows(tok, "anatomy", items, setup["devs"]["anatomy"])
    common = os.path.commonprefix([ids for ids, _ in rows])
    head = mmlu.build_prompt("anatomy", items[0], setup["devs"]["anatomy"])
    head = head[:-len(mmlu.doc_text(items[0]))]        # description and examples
    assert eval_mmlu.shared_len(rows) == len(common) >= len(tok.encode_hf([head])[0]) - 1


def test_a_shared_string_that_bpe_merges_onward_is_shared_only_up_to_the_merge(setup):
    """Two questions that both start with "Which ": their prompts share that string, but BPE glues
    the space to the next word, so the tokens of the shared string are not a prefix of either
    prompt's tokens. Only the tokens both prompts really start with are shared, and the scores
    equal direct log-softmax over each whole prompt."""
    tok, model = setup["tok"], setup["model"]
    items = [setup["tests"]["anatomy"][i] for i in (0, 4)]          # "Which organ", "Which carries"
    shots = setup["devs"]["anatomy"]
    prompts = [mmlu.build_prompt("anatomy", item, shots) for item in items]
    shared = os.path.commonprefix(prompts)
    assert shared.endswith("Which ")
    full = tok.encode_hf(prompts)
    shared_ids = tok.encode_hf([shared])[0]
    assert all(ids[:len(shared_ids)] != shared_ids for ids in full)  # the case this test is for
    rows = letter_rows(tok, "anatomy", items, shots)
    assert eval_mmlu.shared_len(rows) == len(tok.encode_hf([shared.removesuffix(" ")])[0])
    res = eval_mmlu.evaluate(model, tok, {"anatomy": items}, setup["devs"], shots=5)
    for rec, ids in zip(res["questions"], full):
        lp = direct_logprobs(model, ids)[-1]
        assert rec["loglik"] == pytest.approx([lp[tok.encode(" " + L)[0]].item() for L in LETTERS],
                                              abs=1e-4)


def test_batches_cost_the_least_of_every_way_to_cut():
    """batches' dynamic programme against every cut of 9 sorted lengths into runs of at most 3:
    padded tokens plus the per-batch overhead."""
    lengths = [40, 31, 30, 29, 12, 11, 10, 3, 2]

    def cost(spans):
        return sum(lengths[a] * (b - a) + 8 for a, b in spans)
    best = math.inf
    for cuts in itertools.product([False, True], repeat=len(lengths) - 1):
        ends = [i + 1 for i, cut in enumerate(cuts) if cut] + [len(lengths)]
        spans = list(zip([0] + ends[:-1], ends))
        if all(b - a <= 3 for a, b in spans):
            best = min(best, cost(spans))
    spans = eval_mmlu.batches(lengths, 3, overhead=8)
    assert [a for a, _ in spans][0] == 0 and spans[-1][1] == len(lengths)
    assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
    assert all(b - a <= 3 for a, b in spans) and cost(spans) == best


def test_cloze_scores_equal_direct_computation(setup):
    tok, model = setup["tok"], setup["model"]
    res = eval_mmlu.evaluate(model, tok, setup["tests"], setup["devs"], shots=1, method="cloze",
                             batch_size=5)
    recs = iter(res["questions"])
    for subject, rows in TEST.items():
        for r in rows:
            ctx = ("The following are questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n"
                   f"Question: {DEV[0][0].strip()}\nAnswer: {DEV[0][1]}\n\n"
                   f"Question: {r[0].strip()}\nAnswer:")
            ctx_ids, want = tok.encode(ctx), []
            for choice in r[1:5]:
                cont = tok.encode(ctx + " " + choice)[len(ctx_ids):]
                ids = [tok.bos_id] + ctx_ids + cont
                lp = direct_logprobs(model, ids)
                first = len(ids) - len(cont) - 1  # the position that predicts cont[0]
                want.append(sum(lp[first + j, t].item() for j, t in enumerate(cont)))
            rec = next(recs)
            assert rec["loglik"] == pytest.approx(want, abs=1e-4)
            per_byte = [w / len((" " + c).encode()) for w, c in zip(want, r[1:5])]
            assert rec["pred_per_byte"] == LETTERS[max(range(4), key=per_byte.__getitem__)]


def test_chat_scores_the_letter_at_the_assistant_turn(setup):
    tok, model = setup["tok"], setup["model"]
    item = setup["tests"]["astronomy"][:1]
    res = eval_mmlu.evaluate(model, tok, {"astronomy": item}, setup["devs"], shots=1, chat=True)
    d, r = DEV[0], TEST["astronomy"][0]
    ids = tok.render_prompt([
        {"role": "user", "content": f"{d[0].strip()}\nA. {d[1]}\nB. {d[2]}\nC. {d[3]}\nD. {d[4]}\n"
                                    "Answer with the letter."},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\n"
                                    "Answer with the letter."}])
    lp = direct_logprobs(model, ids)[-1]
    want = [lp[tok.encode(L)[0]].item() for L in LETTERS]
    assert res["questions"][0]["loglik"] == pytest.approx(want, abs=1e-4)


def context_len(tok, item, shots):
    """Length of the letter-method context of an anatomy question with these few-shot examples."""
    return len(eval_mmlu.encode(tok, "anatomy", item, shots, "letter", False)[0])


def test_long_prompt_drops_shots_last_first(setup, monkeypatch):
    tok, model = setup["tok"], setup["model"]
    tests = {"anatomy": setup["tests"]["anatomy"][:1]}
    shots = setup["devs"]["anatomy"]
    room = context_len(tok, tests["anatomy"][0], shots[:2])  # for exactly two examples
    monkeypatch.setattr(model.config, "max_seq_len", room)
    res = eval_mmlu.evaluate(model, tok, tests, setup["devs"], shots=5)
    assert (res["dropped_shots"], res["truncated"]) == (3, 0)
    two_shot, _ = eval_mmlu.encode(tok, "anatomy", tests["anatomy"][0], shots[:2], "letter", False)
    lp = direct_logprobs(model, two_shot)[-1]
    want = [lp[tok.encode(" " + L)[0]].item() for L in LETTERS]
    assert res["questions"][0]["loglik"] == pytest.approx(want, abs=1e-4)


def test_too_long_zero_shot_prompt_keeps_its_last_tokens(setup, monkeypatch):
    tok, model = setup["tok"], setup["model"]
    tests = {"anatomy": setup["tests"]["anatomy"][:1]}
    # even 0-shot is too long: keep the last tokens
    monkeypatch.setattr(model.config, "max_seq_len", context_len(tok, tests["anatomy"][0], []) - 7)
    res = eval_mmlu.evaluate(model, tok, tests, setup["devs"], shots=5)
    assert (res["dropped_shots"], res["truncated"]) == (5, 1)
    ctx, _ = eval_mmlu.encode(tok, "anatomy", tests["anatomy"][0], [], "letter", False)
    lp = direct_logprobs(model, ctx[7:])[-1]
    want = [lp[tok.encode(" " + L)[0]].item() for L in LETTERS]
    assert res["questions"][0]["loglik"] == pytest.approx(want, abs=1e-4)


def always_c_checkpoint(setup):
    """The tiny model rewired so the logit of " C" is sqrt(d_model) and every other logit is 0, at
    every position: attention and MLP write nothing (o_proj, down_proj = 0), every embedding is e_0,
    so the final RMSNorm gives sqrt(d) * e_0, and only the lm_head row of " C" reads dimension 0."""
    tok, model = setup["tok"], setup["model"]
    always = llm.LLM(model.config)
    always.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in always.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        always.embed_tokens.weight.zero_()
        always.embed_tokens.weight[:, 0] = 1.0
        always.lm_head.weight.zero_()
        always.lm_head.weight[tok.encode(" C")[0], 0] = 1.0
    tok = bpe.Tokenizer.load(setup["tmp"] / "tok")
    return checkpoint.save_checkpoint(setup["tmp"] / "always_c", 1, always, {}, {}, {}, tok)


def test_always_c_model_scores_the_fraction_of_c_answers(setup, capsys):
    ckpt = always_c_checkpoint(setup)
    out = setup["tmp"] / "always_c.json"
    eval_mmlu.main(["--ckpt", str(ckpt), "--data", str(setup["data"]), "--device", "cpu",
                    "--out", str(out)])
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    golds = [r[5] for rows in TEST.values() for r in rows]
    assert {q["pred"] for q in res["questions"]} == {"C"}
    assert res["metrics"]["acc"]["micro"]["acc"] == golds.count("C") / len(golds)
    for subject, rows in TEST.items():
        frac = [r[5] for r in rows].count("C") / len(rows)
        assert res["metrics"]["acc"]["subjects"][subject]["acc"] == frac
    fracs = [[r[5] for r in rows].count("C") / len(rows) for rows in TEST.values()]
    assert res["metrics"]["acc"]["macro"] == pytest.approx(sum(fracs) / len(fracs))
    # anatomy and astronomy are stem, world_religions humanities
    assert set(res["metrics"]["acc"]["categories"]) == {"stem", "humanities"}
    stem = res["metrics"]["acc"]["categories"]["stem"]
    assert stem["n"] == len(TEST["anatomy"]) + len(TEST["astronomy"])
    micro = res["metrics"]["acc"]["micro"]
    assert micro["ci95"][0] < micro["acc"] < micro["ci95"][1]
    assert f"| **all (micro)** | {len(golds)} | {100 * micro['acc']:.2f} |" in table
    assert "chance: 25.00%" in table


def test_wilson_interval_matches_known_values():
    # Wilson (1927): 0 successes in 10 -> upper bound z^2 / (n + z^2); 50/100 -> 0.4038..0.5962
    # (Newcombe 1998).
    assert eval_mmlu.wilson(0, 10) == pytest.approx([0.0, 1.96 ** 2 / (10 + 1.96 ** 2)], abs=1e-9)
    assert eval_mmlu.wilson(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)


@pytest.mark.parametrize("bad_row", [("Q?", "a", "b", "c", "D"), ("Q?", "a", "b", "c", "d", "E")])
def test_malformed_csv_row_names_file_and_line(setup, tmp_path, bad_row):
    rows = list(TEST["anatomy"])
    rows.insert(2, bad_row)  # line 3
    write_csv(tmp_path / "test" / "anatomy_test.csv", rows)
    write_csv(tmp_path / "dev" / "anatomy_dev.csv", DEV)
    with pytest.raises(ValueError) as e:
        eval_mmlu.main(["--ckpt", str(setup["ckpt"]), "--data", str(tmp_path), "--device", "cpu"])
    msg = str(e.value)
    assert "anatomy_test.csv" in msg and re.search(r"(line |:)3\b", msg), msg


def test_missing_subject_is_a_clear_error(setup):
    with pytest.raises((ValueError, FileNotFoundError), match="no_such_subject"):
        eval_mmlu.main(["--ckpt", str(setup["ckpt"]), "--data", str(setup["data"]), "--subjects",
                        "anatomy,no_such_subject"])


def test_hf_export_gives_the_same_scores(setup):
    import export_hf
    import transformers
    hf_dir = export_hf.export(setup["ckpt"], setup["tmp"] / "hf")
    hf_model, hf_tok, _ = checkpoint.load_model(hf_dir)
    tests = {"astronomy": setup["tests"]["astronomy"]}
    ours = eval_mmlu.evaluate(setup["model"], setup["tok"], tests, setup["devs"],
                              shots=5)["questions"]
    theirs = eval_mmlu.evaluate(hf_model, hf_tok, tests, setup["devs"], shots=5)["questions"]
    flat = lambda qs: [ll for q in qs for ll in q["loglik"]]
    assert flat(theirs) == pytest.approx(flat(ours), abs=1e-5)
    # and transformers' own LlamaForCausalLM on the exported folder agrees at the answer position
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ctx, conts = eval_mmlu.encode(hf_tok, "astronomy", tests["astronomy"][0],
                                  setup["devs"]["astronomy"][:5], "letter", False)
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ctx])).logits[0, -1].double(), dim=-1)
    assert ours[0]["loglik"] == pytest.approx([lp[c[0]].item() for c in conts], abs=1e-4)


def transformers_encoding(hf_dir, ctx, conts):
    """lm-eval's default encoding with transformers' tokenizer of hf_dir: (context ids,
    continuation ids), add_special_tokens=True."""
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    want = hf(ctx, add_special_tokens=True)["input_ids"]
    return want, [hf(ctx + c, add_special_tokens=True)["input_ids"][len(want):] for c in conts]


@pytest.mark.parametrize("method", ["letter", "cloze"])
def test_exported_kiln_model_prompts_equal_transformers_encoding(setup, tmp_path, method):
    """The export's tokenizer adds <|bos|> itself, so lm-eval with no add_bos_token gets kiln's
    prompts: token for token, from the checkpoint and from the export alike."""
    import export_hf
    hf_dir = export_hf.export(setup["ckpt"], tmp_path / "hf")
    _, hf_tok, _ = checkpoint.load_model(hf_dir)
    item = setup["tests"]["anatomy"][3]
    shots = setup["devs"]["anatomy"][:2]
    ctx = mmlu.build_prompt("anatomy", item, shots, method)
    conts = [" " + (c if method == "cloze" else L) for L, c in zip(LETTERS, item["choices"])]
    want = transformers_encoding(hf_dir, ctx, conts)
    assert want[0][0] == setup["tok"].bos_id
    for tok in (setup["tok"], hf_tok):
        assert eval_mmlu.encode(tok, "anatomy", item, shots, method, False) == want


def test_kiln_tokenizer_trained_before_its_bos_post_processor_keeps_its_prompts(setup, tmp_path):
    """A tokenizer.json without the post-processor (bpe.json beside it, as bpe.py wrote them before)
    still starts every MMLU prompt with <|bos|>, and so does transformers on its export."""
    import export_hf
    obj = json.loads(setup["tok"].data)
    obj["post_processor"] = None
    old = bpe.Tokenizer(json.dumps(obj).encode(), setup["tok"].meta)
    ckpt = checkpoint.save_checkpoint(tmp_path / "run", 1, setup["model"], {}, {}, {}, old)
    _, old, _ = checkpoint.load_model(ckpt)
    item = setup["tests"]["anatomy"][0]
    ctx = mmlu.build_prompt("anatomy", item, [])
    got = eval_mmlu.encode(old, "anatomy", item, [], "letter", False)
    assert got[0] == [old.bos_id] + old.encode(ctx)
    hf_dir = export_hf.export(ckpt, tmp_path / "hf")
    assert got == transformers_encoding(hf_dir, ctx, [" " + L for L in LETTERS])
