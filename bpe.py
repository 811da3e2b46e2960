r"""Byte-level BPE tokenizer for kiln: training, loading, chat rendering with loss masks.

Train on your own text (txt, jsonl[.gz|.zst], C4's .json.gz, parquet or arrow; files, folders or
globs):
    python bpe.py --input data/raw/ --vocab_size 32768 --out data/tok
    python bpe.py --input 'data/fineweb/*.parquet' --vocab_size 32768 --out data/tok \
        --max_chars 2_000_000_000
CPU smoke run (a few seconds):
    python bpe.py --input ../shared/data/tinyshakespeare.txt --vocab_size 1024 --out /tmp/tok

The heavy lifting is Hugging Face `tokenizers` (Rust). This file picks its settings, streams text
into it and adds what a chat model needs: special tokens that plain text can never produce, and
(ids, mask) rendering.
"""
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import common
import config
import readers
import shards

SPECIAL_TOKENS = ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]  # ids 0..4
ROLES = ["system", "user", "assistant"]

# GPT-4's (cl100k) split pattern: text is first cut into pieces and BPE merges never cross a piece,
# so a token never glues a word to the punctuation or digits around it. In order: English
# contractions, a word with at most one leading non-letter (" the", "(hello"), numbers in groups of
# at most 3 digits (so the model sees place value consistently), punctuation runs with their
# trailing newlines, newline runs, and spaces -- where a space run before a word leaves its last
# space to the word (" ", " world").
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Hugging Face chat template that renders exactly what Tokenizer.render_chat / render_prompt
# produce. The {% generation %} block marks the tokens to learn, so
# apply_chat_template(..., return_assistant_tokens_mask=True) also gives render_chat's mask (TRL's
# SFT trainer uses it). One difference by design: Hugging Face tokenizes the rendered string, so a
# literal "<|end|>" typed inside a message becomes the special token there, never here.
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + m['role'] + '|>' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Tokenizer:
    """A trained tokenizer.json plus kiln's chat conventions. Build with Tokenizer.load(path) or
    train()."""

    def __init__(self, data: bytes, meta=None, bos="<|bos|>", eot="<|end|>"):
        self.data = data  # the tokenizer.json bytes, saved back unchanged: the hash survives copies
        self.hash = hashlib.sha256(data).hexdigest()
        self.meta = meta or {}
        self.tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        # Match special tokens only when we insert their ids ourselves: the text "<|user|>" typed by
        # a user becomes ordinary tokens, so nobody can forge a turn. (Not stored in tokenizer.json,
        # so Hugging Face's apply_chat_template still turns the template's markers into special
        # tokens.)
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.tok.token_to_id(bos)
        self.eot_id = self.tok.token_to_id(eot)
        self.role_ids = {r: self.tok.token_to_id(f"<|{r}|>") for r in ROLES}

    @classmethod
    def load(cls, path):
        """A kiln tokenizer dir (tokenizer.json + bpe.json), a tokenizer.json, or a Hugging Face
        model dir."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}: give a tokenizer.json or a folder "
                                    "that holds one")
        meta = {}
        names = {"bos": "<|bos|>", "eot": "<|end|>"}
        if file.name == "tokenizer.json" and (file.parent / "bpe.json").is_file():
            meta = json.loads((file.parent / "bpe.json").read_text())
        elif (file.parent / "tokenizer_config.json").is_file():  # a Hugging Face tokenizer's names
            cfg = json.loads((file.parent / "tokenizer_config.json").read_text())
            for ours, theirs in (("bos", "bos_token"), ("eot", "eos_token")):
                name = cfg.get(theirs)
                names[ours] = name.get("content") if isinstance(name, dict) else name
        try:
            return cls(file.read_bytes(), meta, **names)
        except Exception as e:  # tokenizers raises plain Exceptions for a broken file
            raise ValueError(f"{file} is not a valid tokenizer.json ({e}): re-create it with "
                             "bpe.py") from None

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        # parallel in Rust. (encode_batch_fast, which skips offsets, measured ~20% slower here:
        # bench/bench_bpe.py)
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def _check(self, messages, prompt):
        if None in (self.bos_id, self.eot_id, *self.role_ids.values()):
            raise ValueError("this tokenizer has no kiln chat tokens " + ", ".join(SPECIAL_TOKENS) +
                             ": train one with bpe.py to render chats")
        if not isinstance(messages, list) or not messages:
            raise ValueError("a conversation must be a non-empty list of "
                             "{'role': ..., 'content': ...} dicts")
        expect = ["system", "user"]  # roles allowed at the next position
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                got = m.get("role") if isinstance(m, dict) else type(m).__name__
                raise ValueError(f"message {i}: role must be one of {ROLES}, got {got!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: content must be a string, got "
                                 f"{type(m.get('content')).__name__}")
            if m["role"] not in expect:
                raise ValueError(f"message {i}: expected {' or '.join(expect)} but got {m['role']} "
                                 "(an optional system message first, then user and assistant "
                                 "alternate)")
            expect = ["assistant"] if m["role"] == "user" else ["user"]
        if messages[-1]["role"] == "system" or (prompt and messages[-1]["role"] != "user"):
            raise ValueError(f"message {len(messages) - 1}: the conversation must end with a user "
                             f"message{'' if prompt else ' or an assistant message'}")

    def render_chat(self, messages):
        """ids and a 0/1 mask that is 1 exactly on the tokens to learn: assistant content and its
        <|end|>."""
        self._check(messages, prompt=False)
        ids = [self.bos_id]
        mask = [0]
        for m in messages:
            # each content is encoded on its own, as Hugging Face does between the template's
            # special tokens
            body = self.encode(m["content"]) + [self.eot_id]
            ids += [self.role_ids[m["role"]], *body]
            mask += [0] + [int(m["role"] == "assistant")] * len(body)
        return ids, mask

    def render_prompt(self, messages):
        """Ids of a conversation that ends in a user turn, plus <|assistant|>: the model writes the
        reply."""
        self._check(messages, prompt=True)
        return self.render_chat(messages)[0] + [self.role_ids["assistant"]]

    def token_bytes(self):
        """(vocab_size,) int32: UTF-8 bytes each token stands for, 0 for special tokens (for bits
        per byte). Exact for byte-level tokenizers; for others (e.g. SentencePiece) it decodes each
        token alone. Computed once per Tokenizer (a Python loop over the vocabulary; train.py asks
        at every eval), read-only."""
        if getattr(self, "_token_bytes", None) is not None:
            return self._token_bytes
        out = np.zeros(self.vocab_size, dtype=np.int32)
        byte_level = (json.loads(self.data).get("decoder") or {}).get("type") == "ByteLevel"
        added = self.tok.get_added_tokens_decoder()  # added tokens are stored as plain text
        for i in range(self.vocab_size):
            token = self.tok.id_to_token(i)
            if token is None or (i in added and added[i].special):
                continue
            # byte-level: one printable stand-in character per byte (decoding a lone piece of a
            # multi-byte character would give U+FFFD); otherwise decode the token on its own
            if byte_level and i not in added:
                out[i] = len(token)
            else:
                out[i] = len(self.decode([i]).encode())
        out.flags.writeable = False
        self._token_bytes = out
        return out

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        common.write_atomic(out / "tokenizer.json", self.data)
        meta = {**self.meta, "vocab_size": self.vocab_size, "tokenizer_sha256": self.hash}
        common.write_atomic(out / "bpe.json", (json.dumps(meta, indent=1) + "\n").encode())

    def save_hf(self, out_dir, model_max_length=None):
        """Write a Hugging Face tokenizer folder: AutoTokenizer.from_pretrained(out_dir) then
        works."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        common.write_atomic(out / "tokenizer.json", self.data)
        ends = (("bos_token", self.bos_id), ("eos_token", self.eot_id))
        names = {k: self.tok.id_to_token(i) for k, i in ends if i is not None}
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **names,
               "clean_up_tokenization_spaces": False}
        if None not in self.role_ids.values():
            cfg["chat_template"] = CHAT_TEMPLATE
        if model_max_length:
            cfg["model_max_length"] = model_max_length
        for name, obj in (("tokenizer_config.json", cfg), ("special_tokens_map.json", names)):
            common.write_atomic(out / name, (json.dumps(obj, indent=1) + "\n").encode())


def load_for_data(tokenizer):
    """tokenizer (a Tokenizer, or a path for Tokenizer.load) checked for data preparation: its ids
    fit uint16 token files (shards.check_vocab) and it has <|bos|>, which starts every document."""
    if tokenizer is None:
        raise ValueError("no tokenizer given: pass --tokenizer DIR (train one with "
                         "`python bpe.py --input ...`)")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    shards.check_vocab(tok.vocab_size, "the tokenizer")
    if tok.bos_id is None:
        raise ValueError("the tokenizer has no <|bos|> token: train one with bpe.py")
    return tok


def train(inputs, vocab_size, out_dir, text_field="text", max_chars=None):
    """Train a byte-level BPE on the inputs, save it to out_dir and return it."""
    shards.check_vocab(vocab_size, "the tokenizer to train")  # before any file is read
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is too small: use at least "
                         f"{len(SPECIAL_TOKENS) + 257} (256 bytes, the special tokens, one merge)")
    files = readers.find_files(inputs)
    tok = tokenizers.Tokenizer(models.BPE())
    # No normalizer: the text is tokenized exactly as written. Byte-level: after the split, each
    # piece is turned into its UTF-8 bytes (shown as printable stand-in characters), and all 256
    # bytes are in the initial alphabet, so any string encodes without an unknown token and
    # decodes back exactly.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,  # ids 0..4
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chars = 0

    def texts():  # a generator: tokenizers pulls text as it goes, memory does not grow with corpus
        nonlocal chars
        # tokenizers buffers 256 texts at a time, so 64K-character pieces cap that buffer near 16 MB
        for text in readers.iter_texts(files, text_field, max_chars, chunk_chars=1 << 16):
            chars += len(text)
            yield text
    tok.train_from_iterator(texts(), trainer)
    if chars == 0:
        raise ValueError(f"no text found in {inputs}: check the files and --text_field")
    if tok.get_vocab_size() < vocab_size:
        print(f"note: the text only supports {tok.get_vocab_size()} tokens, not {vocab_size}",
              file=sys.stderr)
    meta = {"special_tokens": SPECIAL_TOKENS, "text_field": text_field, "max_chars": max_chars,
            "chars": chars,
            "inputs": [{"path": str(f), "sha256": common.sha256_file(f)} for f in files]}
    result = Tokenizer(tok.to_str().encode(), meta)
    result.save(out_dir)
    return result


@dataclass
class Args:
    input: list[str] | None = None  # files, folders or globs (required)
    vocab_size: int | None = None   # tokens, at most 65536 (required)
    out: str | None = None          # output folder for tokenizer.json and bpe.json (required)
    text_field: str = "text"        # the text column of jsonl/parquet/arrow inputs
    max_chars: int | None = None    # stop reading after this many characters


def main(argv=None):
    args = config.parse_args(Args(), argv, doc=__doc__)
    for key in ("input", "vocab_size", "out"):
        if getattr(args, key) is None:
            raise ValueError(f"give --{key}: python bpe.py --input FILES --vocab_size N --out DIR")
    tok = train(args.input, args.vocab_size, args.out, args.text_field, args.max_chars)
    print(f"wrote {args.out}/tokenizer.json: {tok.vocab_size} tokens from "
          f"{tok.meta['chars']:,} characters, sha256 {tok.hash[:12]}")


if __name__ == "__main__":
    common.cli(main)
