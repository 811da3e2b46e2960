"""SFT through train.py: token-weighted loss (1 and 2 processes), packing without cross-talk, and a tiny model
that learns to answer and stop. All data is written here: a word corpus, a chat set, a toy MMLU file."""
import json
import os
import random
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bpe
import checkpoint
import conftest
import data
import llm
import train

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
    data.prepare_sft([str(root / "chat.jsonl")], root / "tok", root / "chat", max_len=64, val_fraction=0.05,
                     mmlu_dir=root / "mmlu")
    return root


def random_batch(seed, n_learned, T=32, V=300):
    """(x, y, doc_ids) of one row with exactly n_learned targets; two documents in the row."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(5, V, (2, 1, T), generator=g)
    learned = torch.zeros(T, dtype=torch.bool)
    learned[torch.randperm(T, generator=g)[:n_learned]] = True
    doc_ids = (torch.arange(T) >= T // 3).long()[None]
    return x, y.masked_fill(~learned[None], -1), doc_ids


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return llm.LLM(llm.model_config("tiny", vocab_size=300))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def reference_grads(model, batches):
    """One batch holding both rows; plain mean cross-entropy over every learned token."""
    model.zero_grad()
    x, y, doc_ids = (torch.cat(t) for t in zip(*batches))
    logits, _ = model(x, doc_ids=doc_ids)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    loss.backward()
    return loss.item(), grads(model)


BATCHES = [random_batch(1, 3), random_batch(2, 30)]   # 3 vs 30 learned tokens


def test_token_weighting_one_process():
    model = tiny_model()
    ref_loss, ref = reference_grads(model, BATCHES)
    model.zero_grad()
    loss = train.accumulate_grads(model, BATCHES, 1, nullcontext(), torch.amp.GradScaler("cpu", enabled=False))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    for k, g in grads(model).items():
        torch.testing.assert_close(g, ref[k], rtol=1e-5, atol=1e-7)
    # the test can tell: a mean of the two micro-batch means gives another gradient
    model.zero_grad()
    for x, y, d in BATCHES:
        (model(x, y, doc_ids=d)[1] / 2).backward()
    assert max((p.grad - ref[k]).abs().max().item() for k, p in model.named_parameters()) > 1e-3


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from contextlib import nullcontext
sys.path.insert(0, {root!r})
import llm, train
dist.init_process_group("gloo")
rank = dist.get_rank()
saved = torch.load({inputs!r})
model = llm.LLM(llm.model_config("tiny", vocab_size=300))
model.load_state_dict(saved["weights"])
ddp = torch.nn.parallel.DistributedDataParallel(model)
loss = train.accumulate_grads(ddp, [saved["batches"][rank]], 2, nullcontext(),
                              torch.amp.GradScaler("cpu", enabled=False))
if rank == 0:
    torch.save({{"loss": loss, "grads": {{n: p.grad for n, p in model.named_parameters()}}}}, {out!r})
dist.destroy_process_group()
"""


def test_token_weighting_two_processes(tmp_path):
    """Each of 2 processes (gloo DDP) holds one of the micro-batches: same gradient as the one big batch."""
    model = tiny_model()
    torch.save({"weights": model.state_dict(), "batches": BATCHES}, tmp_path / "inputs.pt")
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), inputs=str(tmp_path / "inputs.pt"),
                                        out=str(tmp_path / "out.pt")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    ref_loss, ref = reference_grads(model, BATCHES)
    assert got["loss"].item() == pytest.approx(ref_loss, rel=1e-5)
    for k, g in got["grads"].items():
        torch.testing.assert_close(g, ref[k], rtol=1e-5, atol=1e-7)


def test_packed_conversation_logits_equal_alone(dirs):
    loader = data.SFTLoader(dirs / "chat", "train", batch_size=4, block_size=64)
    x, y, doc_ids = loader.next_batch()
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
    return [int(t) for t in model.generate(prompt, n, temperature=0, stop_ids=[tok.eot_id])]


def test_sft_teaches_the_format(dirs, tmp_path):
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)
    torch.set_num_threads(1)
    try:
        train.main(["config/tiny.py", f"--data_dir={dirs / 'shards'}", f"--out_dir={tmp_path / 'base'}",
                    "--max_iters=30", "--eval_interval=0"])
        train.main(["config/tiny.py", "--task=sft", f"--init_from={tmp_path / 'base'}", f"--data_dir={dirs / 'chat'}",
                    f"--out_dir={tmp_path / 'sft'}", "--max_iters=80", "--eval_interval=80", "--eval_iters=1",
                    "--sft_samples=2", "--sft_max_new_tokens=16", "--warmup_iters=5"])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    base, tok, _ = checkpoint.load_model(tmp_path / "base")
    sft, _, meta = checkpoint.load_model(tmp_path / "sft")
    assert meta["stage"] == "sft"
    # held out: the training chats repeat 1 to 4 words, these 5
    prompts = ["red cat on a tree", "big old tree and sky", "bird sang over the river", "the dog ran with cat"]
    for words in prompts:
        assert tok.eot_id not in greedy(base, tok, words)   # pretraining text never holds <|end|>
        answer = greedy(sft, tok, words)
        assert answer[-1] == tok.eot_id and answer.index(tok.eot_id) == len(answer) - 1 >= 1, tok.decode(answer)
    rows = [json.loads(line) for line in open(tmp_path / "sft" / "log.jsonl")]
    assert [r["decontaminated"] for r in rows if "decontaminated" in r] == [1]   # the record quoting MMLU
    evals = [r for r in rows if "samples" in r]
    assert len(evals) == 2 and len(evals[-1]["samples"]) == 2 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 1


def test_sft_refuses_data_of_another_tokenizer(dirs, tmp_path):
    bpe.train([str(dirs / "raw.jsonl")], 280, tmp_path / "tok2")
    data.prepare_sft([str(dirs / "chat.jsonl")], tmp_path / "tok2", tmp_path / "chat2", max_len=64,
                     decontaminate=False)
    base = tmp_path / "base"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        train.main(["config/tiny.py", f"--data_dir={dirs / 'shards'}", f"--out_dir={base}", "--max_iters=1",
                    "--eval_interval=0"])
        with pytest.raises(ValueError, match="another tokenizer"):
            train.main(["config/tiny.py", "--task=sft", f"--init_from={base}", f"--data_dir={tmp_path / 'chat2'}",
                        f"--out_dir={tmp_path / 'sft'}"])
    finally:
        os.chdir(cwd)
