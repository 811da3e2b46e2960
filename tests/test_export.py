"""export_hf.py and checkpoint.load_model against Hugging Face transformers' own
LlamaForCausalLM."""
import json

import pytest
import torch
import transformers  # the outside reference: a pinned test dependency, so never skipped

import bpe
import checkpoint
from conftest import random_tiny_model
import export_hf

SHAPES = pytest.mark.parametrize(
    "overrides", [{}, {"n_head": 4, "n_kv_head": 2}, {"n_head": 4, "n_kv_head": 1},
                  {"tie_embeddings": True, "rope_theta": 500000.0}],
    ids=["tiny", "gqa", "mqa", "tied"])


def kiln_checkpoint(tmp_path, model, tokenizer=None):
    opt = torch.optim.AdamW(model.parameters())
    return checkpoint.save_checkpoint(tmp_path / "run", 7, model, opt, {}, {}, tokenizer)


def hf_logits(hf_dir, idx):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return hf(idx).logits, hf


def kiln_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@SHAPES
def test_export_matches_transformers(tmp_path, overrides):
    model = random_tiny_model(**overrides)
    kiln_checkpoint(tmp_path, model)
    # a run folder -> its newest checkpoint
    out = export_hf.export(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf.tmp").exists()
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    want = kiln_logits(model, idx)
    got, hf = hf_logits(out, idx)
    assert (got - want).abs().max().item() <= 1e-4
    assert hf.config.num_key_value_heads == (model.config.n_kv_head or model.config.n_head)
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings


@SHAPES
def test_export_round_trips_exactly(tmp_path, overrides):
    """kiln -> HF folder -> kiln gives the very same tensors."""
    model = random_tiny_model(**overrides)
    kiln_checkpoint(tmp_path, model)
    out = export_hf.export(tmp_path / "run", tmp_path / "hf")
    back, tok, meta = checkpoint.load_model(out)
    assert tok is None and meta["stage"] == "hf" and back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_load_hf_saved_by_transformers(tmp_path):
    """The reverse path with a folder kiln did not write: transformers' save_pretrained, sharded."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=20000.0,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, _, _ = checkpoint.load_model(tmp_path / "hf")
    cfg = model.config
    assert (cfg.n_kv_head, cfg.ffn_hidden, cfg.rope_theta) == (2, 160, 20000.0)
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4


@pytest.fixture
def exported(tmp_path):
    """An export of a random tiny model: (its folder, its config.json as a dict)."""
    kiln_checkpoint(tmp_path, random_tiny_model())
    out = export_hf.export(tmp_path / "run", tmp_path / "hf")
    return out, json.loads((out / "config.json").read_text())


def test_unsupported_hf_folder_is_refused(exported):
    out, config = exported
    rope_scaling = {"rope_type": "linear", "factor": 2}
    (out / "config.json").write_text(json.dumps({**config, "rope_scaling": rope_scaling}))
    with pytest.raises(ValueError, match="uses rope scaling, which kiln's llm.py does not support"):
        checkpoint.load_model(out)


def test_damaged_hf_folder_names_the_missing_tensor(exported):
    out, config = exported
    deeper = {**config, "num_hidden_layers": config["num_hidden_layers"] + 1}
    (out / "config.json").write_text(json.dumps(deeper))
    with pytest.raises(ValueError,
                       match=r"model\.safetensors does not match its model config: .* is missing"):
        checkpoint.load_model(out)


def test_export_refuses_to_overwrite_a_non_export(tmp_path):
    kiln_checkpoint(tmp_path, random_tiny_model())
    (tmp_path / "run" / "config.json").write_text("{}")  # what train.py writes into a run folder
    with pytest.raises(ValueError, match="exists and is not an earlier export"):
        export_hf.export(tmp_path / "run", tmp_path / "run")


def test_reexport_over_an_export(tmp_path):
    kiln_checkpoint(tmp_path, random_tiny_model())
    (tmp_path / "run" / "config.json").write_text("{}")  # what train.py writes into a run folder
    export_hf.main([str(tmp_path / "run"), str(tmp_path / "hf")])
    export_hf.main([str(tmp_path / "run"), str(tmp_path / "hf")])  # over an export: fine
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]


def test_cli_one_argument_is_the_output_folder(tmp_path, monkeypatch):
    """`export_hf.py OUT` exports the newest checkpoint under out/; `--ckpt X --out Y` is the
    long form of `X Y`."""
    model = random_tiny_model()
    checkpoint.save_checkpoint(tmp_path / "out" / "sft", 3, model, {}, {}, {}, None, stage="sft")
    monkeypatch.chdir(tmp_path)
    export_hf.main(["hf_newest"])
    export_hf.main(["--ckpt", "out/sft", "--out", "hf_named"])
    for name in ("hf_newest", "hf_named"):
        back, _, _ = checkpoint.load_model(tmp_path / name)
        assert torch.equal(back.embed_tokens.weight, model.embed_tokens.weight)
    usage = r"usage: python export_hf\.py \[CKPT_OR_RUN_DIR\] OUT_DIR"
    with pytest.raises(ValueError, match=usage):
        export_hf.main(["--ckpt", "out/sft"])


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """(kiln tokenizer, transformers' tokenizer of its export, the export folder)."""
    tmp_path = tmp_path_factory.mktemp("export_tok")
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 50
                    + "Hello world, hello kiln! " * 50)
    tok = bpe.train([str(text)], 300, tmp_path / "tok")
    model = random_tiny_model(vocab_size=384)
    assert tok.vocab_size <= model.config.vocab_size
    kiln_checkpoint(tmp_path, model, tok)
    out = export_hf.export(tmp_path / "run", tmp_path / "hf")
    return tok, transformers.AutoTokenizer.from_pretrained(out), out


def test_exported_tokenizer_encodes_like_kiln(with_tokenizer):
    tok, hf_tok, _ = with_tokenizer
    sample = "Hello, quick fox! The lazy kiln."
    assert hf_tok.encode(sample, add_special_tokens=False) == tok.encode(sample)


def test_exported_tokenizer_decodes_kiln_ids(with_tokenizer):
    tok, hf_tok, _ = with_tokenizer
    sample = "Hello, quick fox! The lazy kiln."
    assert hf_tok.decode(tok.encode(sample)) == sample


def test_exported_chat_template_matches_render_prompt(with_tokenizer):
    tok, hf_tok, _ = with_tokenizer
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello world"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    assert list(ids) == tok.render_prompt(messages)


def test_exported_config_names_the_special_tokens(with_tokenizer):
    tok, _, out = with_tokenizer
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eot_id)


def test_exported_tokenizer_loads_back_unchanged(with_tokenizer):
    tok, _, out = with_tokenizer
    _, tok_back, _ = checkpoint.load_model(out)
    assert tok_back.hash == tok.hash and tok_back.eot_id == tok.eot_id
