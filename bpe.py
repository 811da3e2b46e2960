r"""Byte-level BPE tokenizer for kiln: training, loading, a model's BOS rule and chat template,
chat rendering with loss masks.

Train on your own text (txt, jsonl[.gz|.zst], C4's .json.gz, parquet or arrow; files, folders or
globs):
    python bpe.py --input data/raw/ --vocab_size 32768 --out data/tok
    python bpe.py --input 'data/fineweb/*.parquet' --vocab_size 32768 --out data/tok \
        --max_chars 2_000_000_000
CPU smoke run (a few seconds):
    python bpe.py --input ../shared/data/tinyshakespeare.txt --vocab_size 1024 --out /tmp/tok

The heavy lifting is Hugging Face `tokenizers` (Rust). This file picks its settings, streams text
into it and adds what a chat model needs: special tokens that plain text can never produce, and
(ids, mask) rendering through the model's chat template (kiln's CHAT_TEMPLATE, or the one in a
Hugging Face folder; chat.py renders it).
"""
import functools
import hashlib
import json
import sys
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import chat
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
# literal "<|end|>" typed inside a message becomes the special token there (unless
# sanitize_control_tokens=True), never here.
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


def bos_processor(bos, bos_id):
    """tokenizers' post-processor that writes bos before every text (and each of a pair) when
    encoding with add_special_tokens=True, as Llama 3's tokenizer.json does."""
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def _token_name(value):
    """A special token as tokenizer_config.json names it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A tokenizer.json plus the model's own conventions: its BOS rule and its chat template, kiln's
    (tokenizers trained by bpe.py) or those of a Hugging Face folder (tokenizer_config.json,
    chat_template.jinja). Build with Tokenizer.load(path) or train()."""

    def __init__(self, data: bytes, meta=None, config=None):
        self.data = data  # the tokenizer.json bytes, saved back unchanged: the hash survives copies
        self.hash = hashlib.sha256(data).hexdigest()
        self.meta = meta or {}
        # a Hugging Face tokenizer_config.json (chat template inlined); None: kiln's conventions
        self.config = config
        self.tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        # Match special tokens only when we insert their ids ourselves: the text "<|user|>" typed by
        # a user becomes ordinary tokens, so nobody can forge a turn. (Not stored in tokenizer.json,
        # so Hugging Face's apply_chat_template still turns the template's markers into special
        # tokens.)
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        # kiln's five special tokens at ids 0..4: a tokenizer trained by bpe.py (or its export)
        self.is_kiln = all(self.tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))
        names = {"bos_token": "<|bos|>", "eos_token": "<|end|>"}
        if config is not None:
            names = {k: _token_name(config.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                             "pad_token")}
        # the chat template's variables, as transformers passes them
        self.template_vars = {k: v for k, v in names.items() if isinstance(v, str)}
        self.bos_id = self._id(names["bos_token"])
        self.eot_id = self._id(names["eos_token"])
        self.role_ids = {r: self.tok.token_to_id(f"<|{r}|>") for r in ROLES}
        self.template = (config or {}).get("chat_template") or (CHAT_TEMPLATE if self.is_kiln
                                                                 else None)
        # A kiln tokenizer trained before bpe.train wrote its <|bos|> post-processor: the same rule
        # applies (self.hf), without changing the bytes, whose hash checkpoints and shards record.
        self.old_kiln = self.is_kiln and self.tok.post_processor is None

    def _id(self, name):
        return self.tok.token_to_id(name) if isinstance(name, str) else None

    @classmethod
    def load(cls, path):
        """A kiln tokenizer dir (tokenizer.json + bpe.json), a tokenizer.json, or a Hugging Face
        model dir (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}: give a tokenizer.json or a folder "
                                    "that holds one")
        folder = file.parent
        meta = {}
        if file.name == "tokenizer.json" and (folder / "bpe.json").is_file():
            meta = json.loads((folder / "bpe.json").read_text())
        config = None
        if (folder / "tokenizer_config.json").is_file():  # a Hugging Face tokenizer's conventions
            config = json.loads((folder / "tokenizer_config.json").read_text())
            names = folder / "special_tokens_map.json"
            for key, value in (json.loads(names.read_text()) if names.is_file() else {}).items():
                config.setdefault(key, value)
            if (folder / "chat_template.jinja").is_file():  # transformers' own file wins
                config["chat_template"] = (folder / "chat_template.jinja").read_text()
            elif isinstance(config.get("chat_template"), list):  # named templates: the default
                config["chat_template"] = next((t["template"] for t in config["chat_template"]
                                                if t.get("name") == "default"), None)
        try:
            return cls(file.read_bytes(), meta, config)
        except Exception as e:  # tokenizers raises plain Exceptions for a broken file
            raise ValueError(f"{file} is not a valid tokenizer.json ({e}): re-create it with "
                             "bpe.py") from None

    @functools.cached_property
    def hf(self):
        """This tokenizer as transformers runs it: special tokens written in the text are matched,
        and add_special_tokens=True adds what the model's tokenizer adds, its BOS rule: the
        post-processor in tokenizer.json. (transformers 5 ignores add_bos_token / add_eos_token in
        tokenizer_config.json when a tokenizer.json exists; 4.x's Llama classes rebuilt the
        post-processor from them, which their own tokenizer.json files already agree with.)"""
        hf = tokenizers.Tokenizer.from_str(self.data.decode("utf-8"))
        if self.old_kiln:
            hf.post_processor = bos_processor("<|bos|>", 0)
        return hf

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        # parallel in Rust. (encode_batch_fast, which skips offsets, measured ~20% slower here:
        # bench/bench_bpe.py)
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_hf(self, texts):
        """Ids of each text as transformers' tokenizer gives them with add_special_tokens=True
        (lm-eval's encoding): a BOS only where the model's tokenizer adds one itself (kiln's does),
        special tokens written in the text matched."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def _check(self, messages, prompt):
        if self.template is None:
            raise ValueError("this tokenizer has no chat template (no chat_template in "
                             "tokenizer_config.json, no chat_template.jinja): add the model's "
                             "template there, or train a kiln tokenizer with bpe.py")
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

    def _encode_chat(self, text, spans):
        """(ids, where each token starts in text) of a rendered chat: the whole text as transformers
        encodes it (the template's special tokens matched), except that a content which spells a
        special token (a user typed "<|im_start|>") is encoded on its own, special tokens as plain
        text, as kiln always encodes content."""
        enc = self.hf.encode(text, add_special_tokens=False)
        specials = [(s, e) for i, (s, e) in zip(enc.ids, enc.offsets) if i in self.special_ids]
        forged = [(a, b) for a, b, _ in spans if any(s < b and e > a for s, e in specials)]
        if not forged:
            return enc.ids, [s for s, _ in enc.offsets]
        ids = []
        starts = []
        at = 0
        for a, b in forged + [(len(text), len(text))]:
            for tok, lo, hi in ((self.hf, at, a), (self.tok, a, b)):
                piece = tok.encode(text[lo:hi], add_special_tokens=False)
                ids += piece.ids
                starts += [lo + s for s, _ in piece.offsets]
            at = b
        return ids, starts

    def _render(self, messages, prompt):
        """(ids, mask) of a checked conversation through the chat template (prompt: ending with the
        generation prompt). The mask is 1 on each assistant content and its end-of-turn marker
        (the first special token after it: kiln's <|end|>, ChatML's <|im_end|>), 0 on all else."""
        text, spans = chat.render(self.template, messages, add_generation_prompt=prompt,
                                  **self.template_vars)
        ids, starts = self._encode_chat(text, spans)
        mask = [0] * len(ids)
        for k, (a, b, i) in enumerate(spans):
            if messages[i]["role"] != "assistant":
                continue
            first = bisect_left(starts, a)
            end = bisect_left(starts, b)  # the first token after the content
            limit = spans[k + 1][0] if k + 1 < len(spans) else len(text)
            marker = next((j for j in range(end, len(ids)) if starts[j] >= limit
                           or ids[j] in self.special_ids), len(ids))
            if marker < len(ids) and starts[marker] < limit:
                end = marker + 1
            mask[first:end] = [1] * (end - first)
        return ids, mask

    def render_chat(self, messages):
        """ids and a 0/1 mask that is 1 exactly on the tokens to learn: each assistant content and
        its end-of-turn marker (kiln: <|end|>)."""
        self._check(messages, prompt=False)
        return self._render(messages, prompt=False)

    def render_prompt(self, messages):
        """Ids of a conversation that ends in a user turn, plus the generation prompt (kiln:
        <|assistant|>): the model writes the reply."""
        self._check(messages, prompt=True)
        return self._render(messages, prompt=True)[0]

    @functools.cached_property
    def stop_ids(self):
        """The ids that end a reply: the end-of-turn marker the chat template writes after an
        assistant message (kiln's <|end|>, ChatML's <|im_end|>, Llama 3's <|eot_id|>), then eos."""
        ends = [self.eot_id]
        if self.template is not None:
            try:
                ids, mask = self.render_chat([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}])
                learned = [i for i, m in zip(ids, mask) if m]
                ends = learned[-1:] + ends if learned and learned[-1] in self.special_ids else ends
            except ValueError:  # a template that wants more than this names no marker here
                pass
        return tuple(dict.fromkeys(i for i in ends if i is not None))

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
        """tokenizer.json (unchanged bytes) and bpe.json; a Hugging Face tokenizer's conventions go
        along in its tokenizer_config.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        common.write_atomic(out / "tokenizer.json", self.data)
        meta = {**self.meta, "vocab_size": self.vocab_size, "tokenizer_sha256": self.hash}
        common.write_json(out / "bpe.json", meta, indent=1)
        if self.config is not None:
            common.write_json(out / "tokenizer_config.json", self.config)

    def save_hf(self, out_dir, model_max_length=None):
        """Write a Hugging Face tokenizer folder: AutoTokenizer.from_pretrained(out_dir) then
        works, with this tokenizer's chat template and BOS rule (an old kiln tokenizer gets its
        <|bos|> post-processor written into tokenizer.json, so transformers adds <|bos|> too)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = self.hf.to_str(pretty=True).encode() if self.old_kiln else self.data
        common.write_atomic(out / "tokenizer.json", data)
        ends = (("bos_token", self.bos_id), ("eos_token", self.eot_id))
        names = {k: self.tok.id_to_token(i) for k, i in ends if i is not None}
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **names,
               "clean_up_tokenization_spaces": False}
        if self.config is not None:  # a Hugging Face tokenizer keeps its own settings
            cfg = dict(self.config)
        if self.template is not None:
            cfg["chat_template"] = self.template
        if model_max_length:
            cfg["model_max_length"] = model_max_length
        for name, obj in (("tokenizer_config.json", cfg), ("special_tokens_map.json", names)):
            common.write_json(out / name, obj, indent=1)


def load_for_data(tokenizer, need_bos=True):
    """tokenizer (a Tokenizer, or a path for Tokenizer.load) checked for data preparation: its ids
    fit uint16 token files (shards.check_vocab) and, for pretraining (need_bos), it has a BOS
    token, which starts every document. SFT needs none: the chat template writes what it needs."""
    if tokenizer is None:
        raise ValueError("no tokenizer given: pass --tokenizer DIR (train one with "
                         "`python bpe.py --input ...`)")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    shards.check_vocab(tok.vocab_size, "the tokenizer")
    if need_bos and tok.bos_id is None:
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
    # transformers' tokenizer (and lm-eval, llama.cpp) then start every text with <|bos|>, as
    # kiln's documents start; kiln's own encode (add_special_tokens=False) adds nothing.
    tok.post_processor = bos_processor("<|bos|>", 0)
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
