"""SFT through train.py: packing without cross-talk, a tiny model that learns to answer and stop,
and the tokenizer check. All data is written here: a word corpus, a chat set, a toy MMLU file.
The token-weighted SFT loss is tested on train.train_step itself in test_train_step.py."""
import json
import random
from pathlib import Path

import pytest
import torch

import bpe
import checkpoint
import conftest
from conftest import run_train
import generate
import loader
import sft_data

ROOT = Path(__file__).resolve().parents[1]
WORDS = conftest.WORDS + ["repeat"]
# A 15-word "MMLU test question"; one chat record quotes it and must be removed by decontamination.
MMLU_Q = "which of the following rivers flows past the old stone house under the blue morning sky"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """tokenizer + pretraining shards + an SFT dir of 'repeat <words>' -> '<words>' chats."""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    conftest.word_corpus_shards(root, 300, 60, WORDS, rng)   # root/tok, root/shards
    with open(root / "chat.jsonl", "w") as f:
        for i in range(400):
            words = " ".join(rng.choice(WORDS[:-1]) for _ in range(rng.randint(1, 4)))
            user = f"repeat {words}" if i else f"repeat {MMLU_Q}"
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": words}]}) + "\n")
    (root / "mmlu" / "test").mkdir(parents=True)
    (root / "mmlu" / "test" / "toy_test.csv").write_text(f'"{MMLU_Q}?",a,b,c,d,A\n')
    sft_data.prepare_sft([str(root / "chat.jsonl")], root / "tok", root / "chat", max_len=64,
                         val_fraction=0.05, mmlu_dir=root / "mmlu")
    return root


def tiny_model(seed=0):
    return conftest.tiny_model(seed, vocab_size=300)


def test_packed_conversation_logits_equal_alone(dirs):
    sft_loader = loader.SFTLoader(dirs / "chat", "train", batch_size=4, block_size=64)
    x, _, doc_ids, _ = next(sft_loader)
    model = tiny_model().eval()
    with torch.no_grad():
        packed, _ = model(x, doc_ids=doc_ids)                                    # (B, T, V)
        plain, _ = model(x)
        checked = 0
        for b in range(x.shape[0]):
            for d in doc_ids[b].unique():
                seg = (doc_ids[b] == d).nonzero().flatten()
                alone, _ = model(x[b:b + 1, seg])
                torch.testing.assert_close(packed[b, seg], alone[0], rtol=1e-4, atol=1e-5)
                checked += int(d > 0)
                if d > 0:  # without document masking, later conversations would see earlier ones
                    assert not torch.allclose(plain[b, seg], alone[0], atol=1e-3)
    assert checked >= 4   # several rows really hold more than one conversation


def greedy(model, tok, words, n=16):
    prompt = torch.tensor([tok.render_prompt([{"role": "user", "content": f"repeat {words}"}])])
    return [int(t) for t in generate.generate(model, prompt, n, temperature=0,
                                              stop_ids=[tok.eot_id])]


@pytest.fixture(scope="module")
def runs(dirs, tmp_path_factory):
    """A 30-step pretraining run (out/base) and an 80-step SFT run of it (out/sft)."""
    out = tmp_path_factory.mktemp("runs")
    run_train(["config/tiny.py", f"--data_dir={dirs / 'shards'}", f"--out_dir={out / 'base'}",
               "--max_iters=30", "--eval_interval=0"])
    run_train(["config/tiny.py", "--stage=sft", f"--init_from={out / 'base'}",
               f"--data_dir={dirs / 'chat'}", f"--out_dir={out / 'sft'}", "--max_iters=80",
               "--eval_interval=80", "--eval_iters=1", "--sft_samples=2",
               "--sft_max_new_tokens=16", "--warmup_iters=5"])
    return out


def test_sft_teaches_the_format(runs):
    base, tok, _ = checkpoint.load_model(runs / "base")
    sft, _, meta = checkpoint.load_model(runs / "sft")
    assert meta["stage"] == "sft"
    # held out: the training chats repeat 1 to 4 words, these 5
    prompts = ["red cat on a tree", "big old tree and sky", "bird sang over the river",
               "the dog ran with cat"]
    for words in prompts:
        assert tok.eot_id not in greedy(base, tok, words)   # pretraining text never holds <|end|>
        answer = greedy(sft, tok, words)
        assert answer[-1] == tok.eot_id, tok.decode(answer)
        assert answer.index(tok.eot_id) == len(answer) - 1 >= 1, tok.decode(answer)


def log(run_dir):
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def test_sft_logs_the_decontaminated_count(runs):
    rows = log(runs / "sft")
    assert [r["decontaminated"] for r in rows if "decontaminated" in r] == [1]   # quotes MMLU


def test_sft_eval_samples_answers(runs):
    evals = [r for r in log(runs / "sft") if "samples" in r]
    assert len(evals) == 2 and len(evals[-1]["samples"]) == 2
    assert all(s["prompt"].endswith("<|assistant|>") for s in evals[-1]["samples"])


def test_sft_lowers_val_loss(runs):
    evals = [r for r in log(runs / "sft") if "val_loss" in r]
    assert "val_bpb" not in evals[-1]   # SFT reports the loss of the answers only
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1


def test_sft_refuses_data_of_another_tokenizer(dirs, runs, tmp_path):
    bpe.train([str(dirs / "raw.jsonl")], 280, tmp_path / "tok2")
    sft_data.prepare_sft([str(dirs / "chat.jsonl")], tmp_path / "tok2", tmp_path / "chat2",
                         max_len=64, decontaminate=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        run_train(["config/tiny.py", "--stage=sft", f"--init_from={runs / 'base'}",
                   f"--data_dir={tmp_path / 'chat2'}", f"--out_dir={tmp_path / 'sft'}"])
