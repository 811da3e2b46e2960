"""bpe.py: lossless round trips, special-token safety, chat masks, Hugging Face parity,
determinism, the command line."""
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bpe
import readers

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over lazy dog and then it's gone, isn't it? We'll see: 42 "
         "apples cost $3.50 def main(): return x + 1  # comment\n\tindent Zürich naïve café 東京 "
         "日本語 Привет мир 🙂 🚀 e\u0301").split(" ")
# Every edge case we care about, mixed into hypothesis strings so they appear often, not by luck.
PIECES = [*bpe.SPECIAL_TOKENS, "<|", "|>", " " * 40, "\n\n\n", "\r\n", "\t \t", "\x00", "\x1b[0m",
          "\u200b", "e\u0301\u0308", "👩\u200d👩\u200d👧", "🇫🇷", "中文字符", "ﷺ", "\U0010ffff", "\ufeff"]


def corpus_text():
    rng = random.Random(0)
    # enough distinct words for hundreds of merges
    made_up = ["".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiouy")
                       for _ in range(rng.randint(1, 4))) for _ in range(2000)]
    lines = [" ".join(rng.choice(WORDS + made_up) for _ in range(rng.randint(3, 20)))
             for _ in range(3000)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return bpe.train([str(corpus)], 600, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok_bytes(tok):
    return tok.token_bytes()


text_strategy = st.lists(st.one_of(st.text(), st.sampled_from(PIECES)), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(text_strategy)
def test_round_trip_any_unicode(tok, tok_bytes, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    # plain text never yields a special token
    assert not set(ids) & set(range(len(bpe.SPECIAL_TOKENS)))
    assert tok_bytes[ids].sum() == len(s.encode("utf-8"))
    assert tok.encode_batch([s, s]) == [ids, ids]


def test_round_trip_real_files(tok, shared_data):
    files = sorted((shared_data / "gutenberg").glob("*.txt"))
    files.append(shared_data / "tinyshakespeare.txt")
    texts = [f.read_bytes().decode("utf-8") for f in files if f.is_file()]  # \r\n kept as is
    assert len(texts) >= 2
    nbytes = tok.token_bytes()
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text
        assert nbytes[ids].sum() == len(text.encode("utf-8"))  # what bits-per-byte divides by


def test_token_bytes_of_single_tokens(tok):
    nbytes = tok.token_bytes()
    assert nbytes.shape == (tok.vocab_size,) and nbytes.dtype == np.int32
    n_special = len(bpe.SPECIAL_TOKENS)
    assert (nbytes[:n_special] == 0).all() and (nbytes[n_special:] > 0).all()
    # every token that decodes to whole characters on its own: its UTF-8 length (the rest is
    # covered by the sums)
    whole = [(i, tok.decode([i])) for i in range(len(bpe.SPECIAL_TOKENS), tok.vocab_size)]
    whole = [(i, s) for i, s in whole if "\ufffd" not in s]
    assert len(whole) > 300
    assert all(nbytes[i] == len(s.encode("utf-8")) for i, s in whole)


@pytest.mark.parametrize("special", bpe.SPECIAL_TOKENS)
def test_special_token_text_is_ordinary(tok, special):
    for text in (special, f"Hi {special} there", f"{special}{special}", f"x{special}\n"):
        ids = tok.encode(text)
        assert min(ids) >= len(bpe.SPECIAL_TOKENS) and tok.decode(ids) == text
    # but the tokenizer does know the token: its id is the spec's
    assert tok.tok.token_to_id(special) == bpe.SPECIAL_TOKENS.index(special)


def conversation(rng, n_turns, system, end_with_user=False):
    def say():
        return rng.choice(["", " ", "Hello!", "  two  spaces ", "line\nbreak\n\n", "数学 🙂",
                           "x <|end|> y", "<|assistant|>", "What is 17*23?", "It's 391.",
                           "\ttab\r\n", "e\u0301"]) + rng.choice(WORDS)
    msgs = [{"role": "system", "content": say()}] if system else []
    for _ in range(n_turns):
        msgs += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
    return msgs + [{"role": "user", "content": say()}] if end_with_user else msgs


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("n_turns", [1, 2, 3, 4, 5])
def test_mask_covers_exactly_assistant_content_and_end(tok, n_turns, system):
    msgs = conversation(random.Random(n_turns), n_turns, system)
    ids, mask = tok.render_chat(msgs)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    # the whole rendering, rebuilt from strings
    text = "<|bos|>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in msgs)
    assert tok.decode(ids) == text
    # each maximal run of 1s is one assistant reply followed by <|end|>, in order, right after
    # <|assistant|>
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(runs) == len(replies) == n_turns
    for (a, b), reply in zip(runs, replies):
        assert ids[a - 1] == tok.role_ids["assistant"] and ids[b - 1] == tok.eot_id
        assert tok.decode(ids[a:b]) == reply + "<|end|>"
        assert tok.eot_id not in ids[a:b - 1]  # a literal "<|end|>" in a reply is not the end token


def test_render_prompt(tok):
    msgs = conversation(random.Random(7), 2, True, end_with_user=True)
    ids = tok.render_prompt(msgs)
    assert ids[-1] == tok.role_ids["assistant"]
    assert ids[:-1] == tok.render_chat(msgs)[0]


@pytest.mark.parametrize("msgs, error", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "bot", "content": "x"}], "message 0: role must be one of"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1: expected assistant"),
    ([{"role": "assistant", "content": "a"}], "message 0: expected system or user"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "message 1: expected user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "s"}],
     "message 2: expected user but got system"),
    ([{"role": "user", "content": 3}], "message 0: content must be a string, got int"),
    ([{"role": "user"}], "message 0: content must be a string"),
    (["user: hi"], "message 0: role must be"),
    ([{"role": "system", "content": "s"}], "must end with a user message"),
])
def test_malformed_conversations(tok, msgs, error):
    with pytest.raises(ValueError, match=error):
        tok.render_chat(msgs)


def test_render_prompt_needs_user_last(tok):
    with pytest.raises(ValueError, match="message 1: the conversation must end with a user"):
        tok.render_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_hugging_face_chat_template_matches(tok, tmp_path):
    import transformers
    tok.save_hf(tmp_path, model_max_length=2048)
    hf_auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                                   bos_token="<|bos|>", eos_token="<|end|>",
                                                   chat_template=bpe.CHAT_TEMPLATE)
    assert hf_auto.bos_token == "<|bos|>" and hf_auto.eos_token == "<|end|>"
    assert hf_auto.model_max_length == 2048
    rng, checked = random.Random(0), 0
    for n in range(24):
        msgs = conversation(rng, 1 + n % 4, system=n % 3 == 0, end_with_user=n % 2 == 1)
        # Hugging Face would parse the markers
        msgs = [{**m, "content": m["content"].replace("<|", "<")} for m in msgs]
        for hf in (hf_auto, hf_file):
            if msgs[-1]["role"] == "user":
                got = hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
                assert got == tok.render_prompt(msgs)
            ids, mask = tok.render_chat(msgs)
            out = hf.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
            assert out["input_ids"] == ids and out["assistant_masks"] == mask
            checked += 1
    assert checked >= 40
    assert hf_auto.decode(ids) == tok.decode(ids)


def test_same_inputs_give_identical_file(tok, corpus, tmp_path):
    # a second training run, through the command line, must write the very same bytes
    subprocess.run([sys.executable, str(ROOT / "bpe.py"), "--input", str(corpus),
                    "--vocab_size", "600", "--out", str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / "tokenizer.json").read_bytes() == tok.data
    meta = json.loads((tmp_path / "bpe.json").read_text())
    assert meta["vocab_size"] == 600 and meta["special_tokens"] == bpe.SPECIAL_TOKENS
    sha256 = hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert meta["inputs"] == [{"path": str(corpus), "sha256": sha256}]
    assert bpe.Tokenizer.load(tmp_path).hash == tok.hash


def test_too_large_vocab_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    # the input does not exist: a vocab error (not a missing-file error) proves the check comes
    # first
    with pytest.raises(ValueError, match="vocab_size 65537 .* uint16"):
        bpe.train([str(tmp_path / "missing.txt")], 65537, out)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        bpe.train([str(tmp_path / "missing.txt")], 65536, out)
    cmd = [sys.executable, str(ROOT / "bpe.py"), "--input", "nope", "--vocab_size", "100000",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: vocab_size 100000")
    assert r.stderr.count("\n") == 1
    assert not out.exists()


def test_too_small_vocab_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 200 is too small: use at least 262"):
        bpe.train([str(tmp_path / "missing.txt")], 200, tmp_path / "out")


@pytest.mark.parametrize("missing", ["--input", "--vocab_size", "--out"])
def test_command_line_names_a_missing_option(tmp_path, missing):
    given = {"--input": "x.txt", "--vocab_size": "300", "--out": str(tmp_path / "out")}
    argv = [part for key, value in given.items() if key != missing for part in (key, value)]
    with pytest.raises(ValueError, match=f"give {missing}"):
        bpe.main(argv)


def test_command_line_takes_key_equals_value(tok, corpus, tmp_path):
    bpe.main([f"--input={corpus}", "--vocab_size=600", f"--out={tmp_path}"])
    assert (tmp_path / "tokenizer.json").read_bytes() == tok.data


def test_txt_chunks_pre_tokenize_like_the_whole_file(tok, tmp_path):
    rng = random.Random(0)  # many newline/space runs, so chunk boundaries land inside them
    ends = ["\n", "\n\n", "\n  ", " \n\n\t", "\r\n", " "]
    whole = "".join(rng.choice(WORDS) + rng.choice(ends) for _ in range(800))
    path = tmp_path / "chunked.txt"
    path.write_bytes(whole.encode())
    pre_tokenize = tok.tok.pre_tokenizer.pre_tokenize_str
    # cuts are exact below 8 x chunk_chars
    longest_line = max(map(len, re.split(r"\n(?=\S)", whole)))
    for chunk_chars in range(longest_line // 8 + 1, longest_line // 8 + 40, 3):
        chunks = list(readers.iter_texts([path], chunk_chars=chunk_chars))
        assert len(chunks) > 20 and "".join(chunks) == whole
        pieces = [p for c in chunks for p, _ in pre_tokenize(c)]
        assert pieces == [p for p, _ in pre_tokenize(whole)]
    path.write_text("no newline at all " * 200)  # no safe cut: pieces stay bounded, text intact
    chunks = list(readers.iter_texts([path], chunk_chars=50))
    assert "".join(chunks) == path.read_text() and max(map(len, chunks)) <= 9 * 50


def test_load_kiln_dir_file_and_hf_dir(tok, tmp_path):
    tok.save(tmp_path / "kiln")
    tok.save_hf(tmp_path / "hf")
    for path in (tmp_path / "kiln", tmp_path / "kiln" / "tokenizer.json", tmp_path / "hf"):
        other = bpe.Tokenizer.load(path)
        assert other.hash == tok.hash and (other.bos_id, other.eot_id) == (0, 4)
        assert other.encode("hello <|user|> world") == tok.encode("hello <|user|> world")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        bpe.Tokenizer.load(tmp_path / "absent")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        bpe.Tokenizer.load(tmp_path / "bad.json")


def test_foreign_hf_tokenizer(tmp_path):
    import tokenizers
    t = tokenizers.Tokenizer(tokenizers.models.BPE())
    t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                             show_progress=False, initial_alphabet=alphabet)
    t.train_from_iterator([corpus_text()[:5000]], trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    bare = bpe.Tokenizer.load(tmp_path)
    assert bare.bos_id is None and bare.eot_id is None
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = bpe.Tokenizer.load(tmp_path)
    assert (hf.bos_id, hf.eot_id) == (0, 1)
    assert hf.encode("<s>hi</s>")[0] != 0 and hf.decode(hf.encode("<s>hi</s>")) == "<s>hi</s>"
    with pytest.raises(ValueError, match="no chat template"):
        hf.render_chat([{"role": "user", "content": "hi"}])
    text = "a foreign <s> text 🙂"
    assert hf.token_bytes()[hf.encode(text)].sum() == len(text.encode())


def old_kiln_tokenizer(tok, out):
    """tok as bpe.train wrote it before the <|bos|> post-processor: tokenizer.json without one,
    beside bpe.json."""
    obj = json.loads(tok.data)
    obj["post_processor"] = None
    old = bpe.Tokenizer(json.dumps(obj).encode(), tok.meta)
    old.save(out)
    return bpe.Tokenizer.load(out)


def test_trained_tokenizer_adds_bos_only_for_transformers(tok, tmp_path):
    """kiln's own encode adds nothing; transformers' default encoding (add_special_tokens=True, as
    lm-eval encodes) of the exported tokenizer starts with <|bos|>, as encode_hf does."""
    import transformers
    tok.save_hf(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the quick brown fox 🙂"
    assert tok.encode(text)[0] != tok.bos_id
    assert hf(text)["input_ids"] == [tok.bos_id] + tok.encode(text) == tok.encode_hf([text])[0]


def test_old_kiln_tokenizer_adds_bos_with_its_bytes_unchanged(tok, tmp_path):
    old = old_kiln_tokenizer(tok, tmp_path / "old")
    on_disk = (tmp_path / "old" / "tokenizer.json").read_bytes()
    assert old.hash == hashlib.sha256(on_disk).hexdigest()
    text = "the quick brown fox 🙂"
    assert old.encode_hf([text])[0] == [old.bos_id] + old.encode(text) == tok.encode_hf([text])[0]
    assert old.hash != tok.hash and bpe.Tokenizer.load(tmp_path / "old").hash == old.hash


def test_old_kiln_tokenizer_export_adds_bos(tok, tmp_path):
    import transformers
    old = old_kiln_tokenizer(tok, tmp_path / "old")
    old.save_hf(tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the quick brown fox 🙂"
    assert hf(text)["input_ids"] == [old.bos_id] + old.encode(text)


def test_hugging_face_conventions_survive_save(tmp_path):
    """A Hugging Face tokenizer saved the kiln way (an SFT data dir, a checkpoint) keeps its
    names and chat template (chat_template.jinja wins over the config's, as in transformers)."""
    import tokenizers
    t = tokenizers.Tokenizer(tokenizers.models.BPE())
    t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([corpus_text()[:5000]], trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert bpe.Tokenizer.load(tmp_path).template == "y"  # named templates: the default one
    (tmp_path / "chat_template.jinja").write_text(template)
    hf = bpe.Tokenizer.load(tmp_path)
    hf.save(tmp_path / "saved")
    back = bpe.Tokenizer.load(tmp_path / "saved")
    assert (back.hash, back.template, back.bos_id, back.eot_id) == (hf.hash, template, 0, 1)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert back.render_chat(msgs) == hf.render_chat(msgs)
