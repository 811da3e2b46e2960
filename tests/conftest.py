"""Shared test set-up: the repo root on sys.path, the real data beside the checkout, quiet CPU threads."""
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bpe  # noqa: E402  (after the sys.path line: the repo root holds the modules)
import data  # noqa: E402
import llm  # noqa: E402
SHARED_DATA = ROOT.parent / "shared" / "data"

# Two cores on CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


def skip_or_fail_on_ci(reason):
    """Skip on a developer's machine; fail on CI (CI=true), which always has the data and Chromium."""
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI=true: this must run on CI)")
    pytest.skip(reason)


@pytest.fixture
def shared_data():
    """../shared/data beside the checkout (real MMLU, Gutenberg, tiny-shakespeare); skips when absent."""
    if not SHARED_DATA.is_dir():
        skip_or_fail_on_ci("../shared/data is not present beside the checkout")
    return SHARED_DATA


WORDS = ("the a cat dog sat ran on under big small red blue house tree river stone old new and with "
         "sky over quick slow green bird sang morning night").split()


def word_corpus_shards(root, n_docs, max_words, words=WORDS, rng=None):
    """Made-up sentences of 20..max_words words -> root/raw.jsonl -> a 300-token BPE (root/tok) -> pretraining
    shards (root/shards, 10% validation). Returns the shards dir; rng (default Random(0)) is drawn from."""
    rng = rng or random.Random(0)
    with open(root / "raw.jsonl", "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, max_words)))}) + "\n")
    bpe.train([str(root / "raw.jsonl")], 300, root / "tok")
    data.prepare([str(root / "raw.jsonl")], root / "tok", root / "shards", val_fraction=0.1, workers=1)
    return root / "shards"


def tiny_model(seed=0, **overrides):
    """The tiny preset (plus overrides) as initialised for training, seeded."""
    torch.manual_seed(seed)
    return llm.LLM(llm.model_config("tiny", **overrides))


def random_tiny_model(seed=0, **overrides):
    """The tiny preset (plus overrides) in eval mode with random weights of unit-ish scale, norm weights too, so
    every path changes the logits noticeably (init's ones and N(0, 0.02) would hide a swapped norm or rope)."""
    torch.manual_seed(seed)
    model = llm.LLM(llm.model_config("tiny", **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model.eval()


# Words with every kind of text a tokenizer must survive: accents, CJK, Cyrillic, emoji, digits.
UNICODE_WORDS = ("the a river stone lantern quiet seven clock garden north paper window early silver "
                 "orchard thunder Zürich café naïve 東京 Привет 🙂 don't it's 1999 42.5 (note) -- hello, "
                 "world!").split()


def make_docs(n, seed=0):
    """n made-up documents of 12..60 UNICODE_WORDS each, ending with a full stop."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(UNICODE_WORDS) for _ in range(rng.randint(12, 60))) + "."
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A 400-token BPE trained on 200 make_docs documents (the data and SFT tests' tokenizer)."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "corpus.txt").write_text("\n\n".join(make_docs(200, seed=1)), encoding="utf-8")
    out = tmp_path_factory.mktemp("tok")
    bpe.train([str(folder / "corpus.txt")], 400, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return bpe.Tokenizer.load(tok_dir)


def run_train(argv):
    """train.main in this process, from the repo root (configs are relative paths), one thread."""
    import train
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)
    torch.set_num_threads(1)
    try:
        return train.main(argv)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
