"""GGUF export (gguf_export.py, export_hf.py --gguf) against outside readers: transformers' GGUF
loader (which dequantizes and undoes llama.cpp's q/k row order) for the model and the tokenizer,
and the gguf package's own reader and tensor-name map for what the file holds."""
import json

import gguf
import jinja2
import pytest
import tokenizers
import torch
import transformers  # the outside reference: a pinned test dependency, so never skipped

import bpe
import checkpoint
from conftest import make_docs, random_tiny_model
import export_hf
import generate
import gguf_export
import llm

SHAPES = pytest.mark.parametrize(
    "overrides", [{}, {"n_head": 4, "n_kv_head": 2}, {"n_head": 4, "n_kv_head": 1},
                  {"tie_embeddings": True, "rope_theta": 500000.0}],
    ids=["tiny", "gqa", "mqa", "tied"])


@pytest.fixture(scope="module")
def corpus_tok(tmp_path_factory):
    """(40 make_docs documents, a 400-token kiln BPE trained on them)."""
    folder = tmp_path_factory.mktemp("gguf_tok")
    docs = make_docs(40, seed=3)
    (folder / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    return docs, bpe.train([str(folder / "corpus.txt")], 400, folder / "tok")


def write(tmp_path, model, tok, kind, **kw):
    return gguf_export.write_gguf(model, tok, tmp_path / f"model_{kind}.gguf", kind, **kw)


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def field(path, key):
    return gguf.GGUFReader(path).fields[key].contents()


def test_tensor_names_are_llama_cpp_names():
    """kiln's table against gguf's own map from Hugging Face Llama names to llama.cpp's."""
    model = llm.LLM(llm.model_config("tiny"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.n_layer)
    ours = dict(gguf_export.gguf_tensors(model))
    for name in model.state_dict():
        hf_name = name if name == "lm_head.weight" else "model." + name
        assert names.get_name(hf_name.removesuffix(".weight")) + ".weight" in ours, name
    assert len(ours) == len(model.state_dict())


@SHAPES
def test_f32_file_gives_kiln_logits(tmp_path, corpus_tok, overrides):
    _, tok = corpus_tok
    model = random_tiny_model(**overrides)
    hf = hf_model(write(tmp_path, model, tok, "f32"))
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind, matrix", [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"),
                                          ("q8_0", "Q8_0")])
def test_matrices_take_the_type_and_norms_stay_f32(tmp_path, corpus_tok, kind, matrix):
    _, tok = corpus_tok
    path = write(tmp_path, random_tiny_model(), tok, kind)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    assert {types[n] for n in types if not n.endswith("norm.weight")} == {matrix}
    assert field(path, "general.file_type") == gguf_export.TYPES[kind][1]


def test_q8_0_rows_not_in_whole_blocks_fall_back_to_f16(tmp_path, corpus_tok):
    """d_model 48 is not a multiple of q8_0's 32-value block; ffn_hidden 256 is."""
    _, tok = corpus_tok
    path = write(tmp_path, random_tiny_model(d_model=48), tok, "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"


def test_metadata_states_the_model_shape(tmp_path, corpus_tok):
    _, tok = corpus_tok
    model = random_tiny_model(n_kv_head=2, rope_theta=20000.0)
    path = write(tmp_path, model, tok, "f16")
    c = model.config
    want = {"general.architecture": "llama", "llama.context_length": c.max_seq_len,
            "llama.embedding_length": c.d_model, "llama.block_count": c.n_layer,
            "llama.feed_forward_length": c.ffn_hidden, "llama.attention.head_count": c.n_head,
            "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 20000.0,
            "llama.rope.dimension_count": c.head_dim, "llama.vocab_size": c.vocab_size}
    assert {key: field(path, key) for key in want} == want
    eps = field(path, "llama.attention.layer_norm_rms_epsilon")
    assert eps == pytest.approx(c.norm_eps)


def test_tokenizer_metadata_is_llama_cpp_byte_level_bpe(tmp_path, corpus_tok):
    _, tok = corpus_tok
    path = write(tmp_path, random_tiny_model(), tok, "f16")  # model vocab 512 > 400 tokens
    assert field(path, "tokenizer.ggml.model") == "gpt2"
    assert field(path, "tokenizer.ggml.pre") == "llama-bpe"
    assert (field(path, "tokenizer.ggml.bos_token_id"),
            field(path, "tokenizer.ggml.eos_token_id")) == (tok.bos_id, tok.eot_id)
    assert field(path, "tokenizer.ggml.add_bos_token") is True
    types = field(path, "tokenizer.ggml.token_type")
    tokens = field(path, "tokenizer.ggml.tokens")
    assert len(tokens) == 512 and tokens[:5] == bpe.SPECIAL_TOKENS and tokens[511] == "[PAD511]"
    assert types[:5] == [gguf.TokenType.CONTROL] * 5 and types[5] == gguf.TokenType.NORMAL
    assert set(types[tok.vocab_size:]) == {gguf.TokenType.UNUSED}


# 20 texts: the make_docs mixture (accents, CJK, Cyrillic, emoji, contractions, numbers) and the
# whitespace the split pattern treats specially
TEXTS = make_docs(12, seed=9) + [
    "  two leading spaces", "trailing spaces   ", "line one\nline two\n\n\nthree",
    "tabs\tand\r\nwindows lines", "12345678901 digits in threes", "DON'T SHOUT, it's fine",
    "punctuation!!! (brackets) [x] {y} ...", " \n \t mixed whitespace"]


def test_gguf_tokenizer_gives_kiln_ids(tmp_path, corpus_tok):
    _, tok = corpus_tok
    hf_tok = hf_tokenizer(write(tmp_path, random_tiny_model(), tok, "f16"))
    assert len(TEXTS) == 20
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_gguf_tokenizer_splits_text_like_kiln(tmp_path, corpus_tok):
    """The pieces BPE runs on, compared directly: a small vocabulary can hide a different split
    (its merges rarely span the places where two split patterns disagree)."""
    _, tok = corpus_tok
    hf_tok = hf_tokenizer(write(tmp_path, random_tiny_model(), tok, "f16"))
    ours = tok.tok.pre_tokenizer
    theirs = hf_tok.backend_tokenizer.pre_tokenizer
    for text in TEXTS:
        assert theirs.pre_tokenize_str(text) == ours.pre_tokenize_str(text), text


def test_gguf_tokenizer_puts_bos_first_like_kiln_documents(tmp_path, corpus_tok):
    _, tok = corpus_tok
    hf_tok = hf_tokenizer(write(tmp_path, random_tiny_model(), tok, "f16"))
    assert hf_tok.encode(TEXTS[0]) == [tok.bos_id] + tok.encode(TEXTS[0])


def test_gguf_chat_template_renders_kiln_prompts(tmp_path, corpus_tok):
    _, tok = corpus_tok
    path = write(tmp_path, random_tiny_model(), tok, "f16")
    hf_tok = hf_tokenizer(path)
    conversations = [[{"role": "user", "content": TEXTS[i]}] for i in range(3)] + [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
         {"role": "assistant", "content": "Hi."}, {"role": "user", "content": TEXTS[3]}]]
    for messages in conversations:
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
        assert list(ids) == tok.render_prompt(messages)


def test_generation_markers_become_plain_jinja():
    """transformers' {% generation %} tag is unknown to plain Jinja engines; the file's template
    renders the same text without it, whitespace control included."""
    template = ("{% for m in messages %}[{%- generation -%} {{ m }} {%- endgeneration %}]"
                "{% endfor %}")
    plain = gguf_export.template_for_engines(template)
    assert jinja2.Template(plain).render(messages=["a", "b"]) == "[a][b]"
    assert "generation %}" not in gguf_export.template_for_engines(bpe.CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def trained(corpus_tok):
    """A tiny model trained 200 AdamW steps (learning rate decaying to 0) on 8 of the documents:
    it has them by heart, so greedy decoding from their openings is confident (top-2 logit margins
    above 2.5) and float16/bfloat16/q8_0 rounding cannot flip a token."""
    docs, tok = corpus_tok
    docs = docs[:8]
    ids = torch.tensor([i for d in docs for i in [tok.bos_id] + tok.encode(d)])
    torch.manual_seed(0)
    model = llm.LLM(llm.model_config("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps = 200
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g).tolist()
        x = torch.stack([ids[s:s + 64] for s in starts])                    # (16, 64)
        y = torch.stack([ids[s + 1:s + 65] for s in starts])                # (16, 64)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    prompts = [[tok.bos_id] + tok.encode(d)[:8] for d in docs[:5]]
    return model.eval(), tok, prompts


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_greedy_tokens_match_kiln(tmp_path, trained, kind):
    model, tok, prompts = trained
    hf = hf_model(write(tmp_path, model, tok, kind))
    for prompt in prompts:
        idx = torch.tensor([prompt])                                          # (1, T)
        want = torch.stack(list(generate.generate(model, idx, 32, temperature=0)), dim=1)
        with torch.no_grad():  # transformers' model, greedy by full forward, no stop token
            for _ in range(32):
                idx = torch.cat([idx, hf(idx).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert idx[0, len(prompt):].tolist() == want[0].tolist()


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, corpus_tok):
    """A Hugging Face Llama folder kiln did not write: a transformers model and a byte-level BPE
    with ChatML specials, the cl100k split, its own ChatML template and no BOS added."""
    docs, _ = corpus_tok
    out = tmp_path_factory.mktemp("hf_chatml")
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(bpe.SPLIT_PATTERN), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw.train_from_iterator(docs, tokenizers.trainers.BpeTrainer(
        vocab_size=350, special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    hf_tok.chat_template = CHATML
    hf_tok.save_pretrained(out)
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out, transformers.AutoTokenizer.from_pretrained(out)


def test_hf_folder_keeps_its_own_template_and_bos_rule(tmp_path, hf_folder):
    folder, folder_tok = hf_folder
    path = export_hf.export_gguf(folder, tmp_path / "hf.gguf", "q8_0")
    assert field(path, "tokenizer.chat_template") == CHATML
    assert field(path, "tokenizer.ggml.add_bos_token") is False
    gguf_tok = hf_tokenizer(path)
    messages = [{"role": "user", "content": TEXTS[0]}]
    for tok in (gguf_tok, folder_tok):
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False) == \
            folder_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    for text in TEXTS:
        assert gguf_tok.encode(text) == folder_tok.encode(text), text


def test_a_split_llama_cpp_does_not_know_is_refused(corpus_tok):
    _, tok = corpus_tok
    spec = json.loads(tok.data)
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}|\p{L}+|\s+|."
    with pytest.raises(ValueError, match="convert_hf_to_gguf.py instead"):
        gguf_export.pre_tokenizer_name(spec)


def kiln_run(tmp_path, tok):
    model = random_tiny_model()
    checkpoint.save_checkpoint(tmp_path / "run", 5, model, {}, {}, {}, tok)
    return model


def test_cli_writes_one_gguf_file_and_replaces_an_old_one(tmp_path, corpus_tok):
    _, tok = corpus_tok
    model = kiln_run(tmp_path, tok)
    out = tmp_path / "kiln.gguf"
    out.write_text("an older export")
    export_hf.main([str(tmp_path / "run"), str(out), "--gguf", "q8_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kiln.gguf", "run"]  # no temporary left
    assert field(out, "general.name") == "run"
    assert field(out, "tokenizer.chat_template") == \
        gguf_export.template_for_engines(bpe.CHAT_TEMPLATE)
    assert field(out, "llama.vocab_size") == model.config.vocab_size


def test_cli_gguf_name_without_a_type_is_refused(tmp_path, corpus_tok):
    _, tok = corpus_tok
    kiln_run(tmp_path, tok)
    with pytest.raises(ValueError, match=r"add --gguf TYPE \(f32, f16, bf16 or q8_0\)"):
        export_hf.main([str(tmp_path / "run"), str(tmp_path / "kiln.gguf")])


def test_unknown_gguf_type_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="--gguf q4_k is not a GGUF type kiln writes"):
        export_hf.main([str(tmp_path / "no_such_run"), "x.gguf", "--gguf", "q4_k"])


def test_checkpoint_without_tokenizer_is_refused(tmp_path):
    kiln_run(tmp_path, None)
    with pytest.raises(ValueError, match="has no tokenizer, and a GGUF file must carry one"):
        export_hf.export_gguf(tmp_path / "run", tmp_path / "kiln.gguf", "f16")
    assert not list(tmp_path.glob("kiln.gguf*"))
