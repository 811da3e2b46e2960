"""common.py: config parsing, the cli error line, checkpoints (save/load round trip, pruning, crash safety)."""
import dataclasses
import json

import pytest
import torch

import common
import llm


@dataclasses.dataclass
class Cfg:
    out_dir: str = "out/x"
    learning_rate: float = 3e-4
    max_iters: int = 100
    batch_size: int = 8
    compile: bool = False
    n_kv_head: int | None = None
    prompt: str = "hi"
    betas: tuple = (0.9, 0.95)


# ---------------------------------------------------------------------------------------------- parse_config


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("# launch: python train.py c.py\nimport math\nbatch_size = 4\nmax_iters = batch_size * 25\n"
                 "learning_rate = 1e-3\n")
    cfg = common.parse_config(Cfg(), [str(f), "--max_iters=7", "--out_dir=out/y"])
    assert (cfg.batch_size, cfg.max_iters, cfg.learning_rate, cfg.out_dir) == (4, 7, 1e-3, "out/y")
    assert Cfg().max_iters == 100  # the defaults are not mutated


def test_config_sharp_edges():
    cfg = common.parse_config(Cfg(), ["--learning_rate=1", "--n_kv_head=2", "--prompt=a=b c", "--max_iters=1e4",
                                      "--betas=(0.8, 0.99)"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # int where a float is expected
    assert cfg.n_kv_head == 2  # a None default can be overridden
    assert cfg.prompt == "a=b c"  # split on the first '=' only
    assert cfg.max_iters == 10000 and isinstance(cfg.max_iters, int)
    assert cfg.betas == (0.8, 0.99)
    assert common.parse_config(Cfg(), ["--prompt=42"]).prompt == "42"  # a str stays a str
    assert common.parse_config(Cfg(), ["--n_kv_head=None"]).n_kv_head is None  # and set back to None
    # A None default is still type-checked, against its annotation (int | None): no traceback deep in llm.py later.
    with pytest.raises(ValueError, match=r"n_kv_head"):
        common.parse_config(Cfg(), ["--n_kv_head=auto"])
    with pytest.raises(ValueError, match=r"n_kv_head expects int"):
        common.parse_config(Cfg(), ["--n_kv_head=2.5"])


@pytest.mark.parametrize("arg,want", [("--compile", True), ("--compile=True", True), ("--compile=true", True),
                                      ("--compile=1", True), ("--compile=False", False), ("--compile=0", False),
                                      ("--compile=false", False)])
def test_config_bools(arg, want):
    assert common.parse_config(Cfg(compile=not want), [arg]).compile is want


def test_config_unknown_key_names_close_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*did you mean learning_rate"):
        common.parse_config(Cfg(), ["--learning_rat=1"])
    f = tmp_path / "c.py"
    f.write_text("batch_sise = 3\n")
    with pytest.raises(ValueError, match=r"'batch_sise' in .*c\.py.*did you mean batch_size"):
        common.parse_config(Cfg(), [str(f)])


def test_config_wrong_type_and_unparsable():
    with pytest.raises(ValueError, match=r"max_iters expects int \(default 100\), got 'abc'") as e:
        common.parse_config(Cfg(), ["--max_iters='abc'"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"max_iters expects int.*got 2\.5"):
        common.parse_config(Cfg(), ["--max_iters=2.5"])
    with pytest.raises(ValueError, match=r"compile expects bool.*got 'yes'"):
        common.parse_config(Cfg(), ["--compile='yes'"])
    with pytest.raises(ValueError, match=r"could not parse --learning_rate=fast: expected a float"):
        common.parse_config(Cfg(), ["--learning_rate=fast"])
    with pytest.raises(ValueError, match=r"--batch_size needs a value"):
        common.parse_config(Cfg(), ["--batch_size"])
    with pytest.raises(ValueError, match=r"unexpected argument 'x'"):
        common.parse_config(Cfg(), ["--batch_size=2", "x"])
    with pytest.raises(FileNotFoundError, match=r"config file nope\.py does not exist"):
        common.parse_config(Cfg(), ["nope.py"])


def test_cli_prints_one_line_and_exits_2(capsys, monkeypatch):
    def main():
        raise ValueError("bad thing\nsecond line: fix it")
    monkeypatch.setenv("KILN_DEBUG", "0")
    with pytest.raises(SystemExit) as e:
        common.cli(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad thing second line: fix it\n"
    monkeypatch.setenv("KILN_DEBUG", "1")
    with pytest.raises(SystemExit):
        common.cli(main)
    assert "Traceback" in capsys.readouterr().err
    common.cli(lambda: None)  # success: no exit


# ---------------------------------------------------------------------------------------------- checkpoints


def tiny_model(**overrides):
    torch.manual_seed(0)
    return llm.LLM(llm.model_config("tiny", **overrides))


def trained(model):
    """One AdamW step so the optimizer has real state to save."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    _, loss = model(idx, targets=idx)
    loss.backward()
    opt.step()
    return opt


def save(out, step, model, opt, **kw):
    state = {"rng": torch.get_rng_state(), "data": {"pos": step * 16}}
    return common.save_checkpoint(out, step, model, opt, {"lr": 1e-3}, state, None, **kw)


def test_save_load_identical(tmp_path):
    model = tiny_model()
    opt = trained(model)
    rng = torch.get_rng_state()
    ckpt = save(tmp_path / "run", 5, model, opt)
    assert ckpt.name == "ckpt_0000005"
    loaded, tok, meta = common.load_model(ckpt)
    assert tok is None and meta["step"] == 5 and meta["run_config"] == {"lr": 1e-3}
    assert loaded.config == model.config
    want = model.state_dict()
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    trainer = common.load_trainer_state(tmp_path / "run")  # a run folder -> its newest checkpoint
    assert trainer["state"]["data"] == {"pos": 80}
    assert torch.equal(trainer["state"]["rng"], rng)
    want_opt = opt.state_dict()
    assert trainer["optimizer"]["param_groups"] == want_opt["param_groups"]
    for i, s in want_opt["state"].items():
        for k, v in s.items():
            assert torch.equal(trainer["optimizer"]["state"][i][k], v)


def test_tied_embeddings_saved_once(tmp_path):
    model = tiny_model(tie_embeddings=True)
    ckpt = save(tmp_path, 1, model, trained(model))
    loaded, _, _ = common.load_model(ckpt)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)


def test_keep_last_and_find_newest(tmp_path):
    model = tiny_model()
    opt = trained(model)
    for step in (10, 20, 30, 40, 1000):
        save(tmp_path, step, model, opt, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000030", "ckpt_0000040", "ckpt_0001000"]
    assert common.find_checkpoint(tmp_path) == tmp_path / "ckpt_0001000"
    assert common.find_checkpoint(tmp_path / "ckpt_0000030") == tmp_path / "ckpt_0000030"


def test_find_checkpoint_default_prefers_first_stage(tmp_path):
    model = tiny_model()
    opt = trained(model)
    save(tmp_path / "out" / "pre", 50, model, opt, stage="pretrain")
    with pytest.raises(FileNotFoundError, match="no sft checkpoint under"):
        common.find_checkpoint(None, stages=("sft",), root=tmp_path / "out")
    assert common.find_checkpoint(None, root=tmp_path / "out").name == "ckpt_0000050"
    sft = save(tmp_path / "out" / "sft", 3, model, opt, stage="sft")
    assert common.find_checkpoint(None, root=tmp_path / "out") == sft
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        common.find_checkpoint(tmp_path / "out")


def test_truncated_weights_give_one_clear_error(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path, 1, model, trained(model))
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        common.load_model(ckpt)
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"optimizer\.pt cannot be loaded"):
        common.load_trainer_state(ckpt)


def test_shape_mismatch_gives_one_clear_error(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path, 1, model, trained(model))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model_config"]["d_model"] *= 2
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its model config: .* has shape"):
        common.load_model(ckpt)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    opt = trained(model)
    good = save(tmp_path, 1, model, opt)
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        if str(f).endswith("state.pt"):  # after model.safetensors and optimizer.pt were written
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full)
    saved_norm = model.norm.weight.detach().clone()
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 2, model, opt, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_0000001"]  # no temp folder, nothing pruned
    assert common.find_checkpoint(tmp_path) == good
    loaded, _, _ = common.load_model(tmp_path)
    assert torch.equal(loaded.norm.weight, saved_norm)


def test_checkpoint_carries_its_tokenizer(tmp_path):
    import bpe
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 40)
    (tmp_path / "b.txt").write_text("zebras zigzag quietly. " * 40)
    tok = bpe.train([str(tmp_path / "a.txt")], 270, tmp_path / "tok_a")
    other = bpe.train([str(tmp_path / "b.txt")], 270, tmp_path / "tok_b")
    model = tiny_model()
    ckpt = common.save_checkpoint(tmp_path / "run", 1, model, trained(model), {}, {}, tok)
    _, loaded, meta = common.load_model(ckpt)
    assert loaded.hash == tok.hash == meta["tokenizer_hash"]
    assert loaded.encode("the cat") == tok.encode("the cat")
    other.save(ckpt)  # someone copies the wrong tokenizer in
    with pytest.raises(ValueError, match="is not the tokenizer this model was trained with"):
        common.load_model(ckpt)
