"""loader.py: seeded order, epochs, ranks, mixtures, SFT packing, and resume from the state that
travels with each batch."""
import json
import random

import numpy as np
import pytest

from conftest import UNICODE_WORDS
import loader
import shards
import sft_data


def make_dir(folder, lengths, vocab=1000, offset=0, tok_hash="0" * 64):
    """Shards of consecutive numbers (mod vocab), so a window is recognised by its first token."""
    folder.mkdir()
    start = offset
    for i, n in enumerate(lengths):
        tokens = np.arange(start, start + n) % vocab
        shards.write_shard(folder / f"train_{i:06d}.bin", tokens, vocab, tok_hash)
        start += n
    return folder


def take(ld, n):
    return [next(ld) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# The seeded permutation


def test_permute_is_a_bijection():
    for n in [1, 2, 3, 7, 64, 1000, 4097]:
        p = loader._permute(np.arange(n), n, key=12345)
        assert sorted(p) == list(range(n))


def test_permute_depends_on_the_key():
    i = np.arange(1000)
    assert not np.array_equal(loader._permute(i, 1000, 1), loader._permute(i, 1000, 2))


# ---------------------------------------------------------------------------------------------
# Pretraining

T, B = 8, 3


@pytest.fixture
def twelve_windows(tmp_path):
    """Two shards of 5 and 7 windows of T tokens (+1 for the last target): every token used."""
    return make_dir(tmp_path / "d", [5 * T + 1, 7 * T + 1], vocab=60000)


@pytest.mark.parametrize("sequential", [True, False])
def test_each_epoch_covers_every_window_once(twelve_windows, sequential):
    d = twelve_windows
    files = sorted(d.glob("*.bin"))
    tokens = np.concatenate([shards.read_shard(f) for f in files]).astype(np.int64)
    one = loader.PretrainLoader(str(d), "train", 2 * B, T, seed=3, sequential=sequential)
    seen = []
    for x, y, doc_ids, _ in take(one, 4):  # 4 steps x 6 windows = 2 epochs of 12 windows
        assert x.shape == (2 * B, T) and np.array_equal(x[:, 1:], y[:, :-1]) and doc_ids is None
        seen += [(xi.tolist(), yi.tolist()) for xi, yi in zip(x, y)]
    expect = sorted([s * T for s in range(5)] + [5 * T + 1 + s * T for s in range(7)])
    for epoch in (seen[:12], seen[12:]):
        xs = sorted(epoch)
        assert sorted(x[0] for x, _ in xs) == expect
        for x, yy in xs:
            assert x == list(range(x[0], x[0] + T)) and yy == list(range(x[0] + 1, x[0] + T + 1))
        # + the last target of each shard
        covered = sorted([t for x, _ in xs for t in x] + [5 * T, 12 * T + 1])
        assert covered == sorted(tokens.tolist())
    if sequential:
        assert [x[0] for x, _ in seen[:12]] == expect
    else:  # a fresh order each epoch
        assert [x[0] for x, _ in seen[:12]] != [x[0] for x, _ in seen[12:]]


@pytest.mark.parametrize("sequential", [True, False])
def test_two_ranks_see_what_one_rank_with_accumulation_sees(twelve_windows, sequential):
    d = str(twelve_windows)
    one = loader.PretrainLoader(d, "train", 2 * B, T, seed=3, sequential=sequential)
    two = [loader.PretrainLoader(d, "train", B, T, rank=r, world_size=2, seed=3,
                                 sequential=sequential) for r in range(2)]
    accum = loader.PretrainLoader(d, "train", B, T, seed=3, sequential=sequential)
    for _ in range(4):
        x, y, _, _ = next(one)
        parts = [next(ld) for ld in two]
        micro = take(accum, 2)
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
        assert np.array_equal(np.concatenate([m[0] for m in micro]), x)
        assert not set(map(tuple, parts[0][0].tolist())) & set(map(tuple, parts[1][0].tolist()))


@pytest.fixture
def mixture(tmp_path):
    """Source a holds tokens < 10000, source b tokens >= 10000."""
    a = make_dir(tmp_path / "a", [4000], vocab=30000)
    b = make_dir(tmp_path / "b", [3000, 2000], vocab=30000, offset=10000)
    return f"{a}:0.7,{b}:0.3"


def test_mixture_resumes_exactly_from_a_saved_state(mixture):
    ld = loader.PretrainLoader(mixture, "train", 4, 16, seed=7)
    *_, state = take(ld, 5)[-1]
    state = json.loads(json.dumps(state))  # as a checkpoint stores it
    cont = take(ld, 20)
    resumed = loader.PretrainLoader(mixture, "train", 4, 16, seed=7)
    resumed.load_state_dict(state)
    for x, y, _, st in cont:
        x2, y2, _, st2 = next(resumed)
        assert np.array_equal(x, x2) and np.array_equal(y, y2) and st == st2
    assert sum(resumed.state_dict()["counts"]) == resumed.state_dict()["pos"]


def test_each_batch_carries_the_state_right_after_it(mixture):
    ld = loader.PretrainLoader(mixture, "train", 4, 16, seed=7)
    states = [st for *_, st in take(ld, 6)]
    assert states[-1] == ld.state_dict()
    assert [s["pos"] for s in states] == [4 * (k + 1) for k in range(6)]
    resumed = loader.PretrainLoader(mixture, "train", 4, 16, seed=7)
    resumed.load_state_dict(states[2])  # the batch after the third is the fourth
    fresh = loader.PretrainLoader(mixture, "train", 4, 16, seed=7)
    fourth = take(fresh, 4)[-1]
    assert np.array_equal(next(resumed)[0], fourth[0])


def test_mixture_is_deterministic_and_near_its_weights(mixture):
    first = [next(loader.PretrainLoader(mixture, "train", 50, 16, seed=7))[0] for _ in range(2)]
    assert np.array_equal(first[0], first[1])
    ld = loader.PretrainLoader(mixture, "train", 4, 16, seed=7)
    xs = np.concatenate([x for x, *_ in take(ld, 100)])
    assert 0.62 < np.mean(xs[:, 0] < 10000) < 0.78


def test_state_of_another_block_size_or_seed_refused(mixture):
    state = loader.PretrainLoader(mixture, "train", 4, 16, seed=7).state_dict()
    with pytest.raises(ValueError, match="block_size"):
        loader.PretrainLoader(mixture, "train", 4, 32, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with seed 7"):  # else the order changes silently
        loader.PretrainLoader(mixture, "train", 4, 16, seed=8).load_state_dict(state)


def test_missing_split_or_other_vocab_refused(tmp_path):
    a = make_dir(tmp_path / "a", [4000], vocab=30000)
    with pytest.raises(FileNotFoundError, match="no val_"):
        loader.PretrainLoader(str(a), "val", 4, 16)
    with pytest.raises(ValueError, match="vocab_size 30000 but the model has 512"):
        loader.PretrainLoader(str(a), "train", 4, 16, vocab_size=512)


def test_mixing_tokenizers_refused(tmp_path):
    # the same vocab size from another tokenizer: the ids mean other things
    a = make_dir(tmp_path / "a", [4000], vocab=30000)
    c = make_dir(tmp_path / "c", [3000], vocab=30000, tok_hash="f" * 64)
    with pytest.raises(ValueError, match="different tokenizers"):
        loader.PretrainLoader(f"{a}:0.5,{c}:0.5", "train", 4, 16)


# ---------------------------------------------------------------------------------------------
# SFT packing

SFT_T, SFT_B = 128, 2  # prepared with max_len 120: every conversation fits a row


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tok):
    """(SFT dir, {ids: mask} of every conversation): 60 random chats."""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)

    def say(lo, hi):
        return " ".join(rng.choice(UNICODE_WORDS) for _ in range(rng.randint(lo, hi)))
    chats = [[{"role": "user", "content": say(3, 30)}, {"role": "assistant", "content": say(1, 30)}]
             for _ in range(60)]
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    sft_data.prepare_sft([str(root / "chat.jsonl")], tok, root / "out", max_len=120,
                         val_fraction=0.1, decontaminate=False)
    rendered = {tuple(tok.render_chat(c)[0]): tok.render_chat(c)[1] for c in chats}
    return root / "out", rendered


def test_sft_epoch_holds_each_conversation_once_with_its_mask(sft):
    d, rendered = sft
    ld = loader.SFTLoader(d, "train", 2 * SFT_B, SFT_T, seed=1)
    assert ld.too_long == 0
    rows = []
    while len(rows) < len(ld.rows):
        x, y, doc, _ = next(ld)
        assert x.shape == y.shape == doc.shape == (2 * SFT_B, SFT_T)
        rows += list(zip(x.numpy(), y.numpy(), doc.numpy()))
    found = []
    for xi, yi, di in rows[:len(ld.rows)]:  # one epoch
        assert di[0] == 0 and np.all(np.diff(di) >= 0)  # doc ids restart per row and count up
        for d_id in np.unique(di):
            pos = np.flatnonzero(di == d_id)
            seg = list(xi[pos])
            if not any(seg):  # padding (token 0), nothing to learn; a conversation has role tokens
                assert np.all(yi[pos] == -1)
                continue
            # a conversation that fills the row to the end has its last token only in y
            key = next(k for k in rendered
                       if list(k[:len(seg)]) == seg and len(k) - len(seg) in (0, 1))
            mask = rendered[key]
            want = [key[t + 1] if t + 1 < len(key) and mask[t + 1] else -1 for t in range(len(seg))]
            assert list(yi[pos]) == want
            found.append(key)
    n_train = json.loads((d / "meta.json").read_text())["train_conversations"]
    assert len(found) == len(set(found)) == n_train


def test_sft_two_ranks_see_what_one_rank_sees(sft):
    d, _ = sft
    ld = loader.SFTLoader(d, "train", 2 * SFT_B, SFT_T, seed=1)
    ranks = [loader.SFTLoader(d, "train", SFT_B, SFT_T, rank=r, world_size=2, seed=1)
             for r in range(2)]
    for _ in range(len(ld.rows) // (2 * SFT_B) + 2):  # past the end of the first epoch
        whole = next(ld)
        parts = [next(r) for r in ranks]
        for k in range(3):  # x, y, doc_ids
            assert np.array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_sft_resumes_from_the_state_of_a_batch(sft):
    d, _ = sft
    ld = loader.SFTLoader(d, "train", 2 * SFT_B, SFT_T, seed=1)
    *_, state = take(ld, 3)[-1]
    assert state == ld.state_dict()
    nxt = next(ld)
    again = loader.SFTLoader(d, "train", 2 * SFT_B, SFT_T, seed=1)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert all(np.array_equal(a, b) for a, b in zip(nxt[:3], next(again)[:3]))
    with pytest.raises(ValueError, match="block_size"):
        loader.SFTLoader(d, "train", 2 * SFT_B, 64, seed=1).load_state_dict(state)


def test_sft_conversations_longer_than_a_row_are_counted(sft):
    d, _ = sft
    offsets = np.load(d / "train_offsets.npy")
    short = loader.SFTLoader(d, "train", 2, 40, seed=1)  # conversations over 41 tokens cannot fit
    assert short.too_long == int(np.sum(np.diff(offsets) > 41)) > 0
