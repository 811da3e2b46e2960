"""checkpoint.py: save/load round trip, pruning, crash safety, finding the newest checkpoint; a
training checkpoint resumed in another dtype (train_state.py). Sharded (FSDP) checkpoints:
test_fsdp_checkpoint.py."""
import json

import pytest
import torch

import checkpoint
from conftest import run_train, tiny_model, word_corpus_shards


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
    return checkpoint.save_checkpoint(out, step, model, opt, {"lr": 1e-3}, state, None, **kw)


def test_save_load_identical(tmp_path):
    model = tiny_model()
    opt = trained(model)
    rng = torch.get_rng_state()
    ckpt = save(tmp_path / "run", 5, model, opt)
    assert ckpt.name == "ckpt_0000005"
    loaded, tok, meta = checkpoint.load_model(ckpt)
    assert tok is None and meta["step"] == 5 and meta["run_config"] == {"lr": 1e-3}
    assert loaded.config == model.config
    want = model.state_dict()
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # a run folder -> its newest checkpoint
    trainer = checkpoint.load_trainer_state(tmp_path / "run")
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
    loaded, _, _ = checkpoint.load_model(ckpt)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)


@pytest.fixture
def five_saves(tmp_path):
    """A run folder saved at steps 10, 20, 30, 40 and 1000 with keep_last=3."""
    model = tiny_model()
    opt = trained(model)
    for step in (10, 20, 30, 40, 1000):
        save(tmp_path, step, model, opt, keep_last=3)
    return tmp_path


def test_keep_last_prunes_the_oldest(five_saves):
    names = sorted(p.name for p in five_saves.iterdir())
    assert names == ["ckpt_0000030", "ckpt_0000040", "ckpt_0001000"]


def test_find_checkpoint_newest_by_step(five_saves):
    assert checkpoint.find_checkpoint(five_saves) == five_saves / "ckpt_0001000"
    ckpt = five_saves / "ckpt_0000030"
    assert checkpoint.find_checkpoint(ckpt) == ckpt  # a checkpoint is itself


def test_find_checkpoint_default_prefers_first_stage(tmp_path):
    model = tiny_model()
    opt = trained(model)
    save(tmp_path / "out" / "pre", 50, model, opt, stage="pretrain")
    with pytest.raises(FileNotFoundError, match="no sft checkpoint under"):
        checkpoint.find_checkpoint(None, stages=("sft",), root=tmp_path / "out")
    assert checkpoint.find_checkpoint(None, root=tmp_path / "out").name == "ckpt_0000050"
    sft = save(tmp_path / "out" / "sft", 3, model, opt, stage="sft")
    assert checkpoint.find_checkpoint(None, root=tmp_path / "out") == sft
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        checkpoint.find_checkpoint(tmp_path / "out")


def test_truncated_weights_give_one_clear_error(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path, 1, model, trained(model))
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    match = r"model\.safetensors is not a readable safetensors file.*truncated"
    with pytest.raises(ValueError, match=match):
        checkpoint.load_model(ckpt)


def test_truncated_optimizer_state_gives_one_clear_error(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path, 1, model, trained(model))
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"optimizer\.pt cannot be loaded"):
        checkpoint.load_trainer_state(ckpt)


def test_shape_mismatch_gives_one_clear_error(tmp_path):
    model = tiny_model()
    ckpt = save(tmp_path, 1, model, trained(model))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model_config"]["d_model"] *= 2
    (ckpt / "meta.json").write_text(json.dumps(meta))
    match = r"model\.safetensors does not match its model config: .* has shape"
    with pytest.raises(ValueError, match=match):
        checkpoint.load_model(ckpt)


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
    # no temp folder, nothing pruned
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_0000001"]
    assert checkpoint.find_checkpoint(tmp_path) == good
    loaded, _, _ = checkpoint.load_model(tmp_path)
    assert torch.equal(loaded.norm.weight, saved_norm)


def test_checkpoint_carries_its_tokenizer(tmp_path):
    import bpe
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 40)
    (tmp_path / "b.txt").write_text("zebras zigzag quietly. " * 40)
    tok = bpe.train([str(tmp_path / "a.txt")], 270, tmp_path / "tok_a")
    other = bpe.train([str(tmp_path / "b.txt")], 270, tmp_path / "tok_b")
    model = tiny_model()
    ckpt = checkpoint.save_checkpoint(tmp_path / "run", 1, model, trained(model), {}, {}, tok)
    _, loaded, meta = checkpoint.load_model(ckpt)
    assert loaded.hash == tok.hash == meta["tokenizer_hash"]
    assert loaded.encode("the cat") == tok.encode("the cat")
    other.save(ckpt)  # someone copies the wrong tokenizer in
    with pytest.raises(ValueError, match="is not the tokenizer this model was trained with"):
        checkpoint.load_model(ckpt)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return word_corpus_shards(tmp_path_factory.mktemp("dtype_data"), 100, 60)


def test_resume_in_another_dtype(data_dir, tmp_path, capsys):
    """A bf16 checkpoint resumed in fp16 gets a fresh loss scale (said once), instead of
    GradScaler's crash on the empty scale a bf16 run saves; fp16 resumed in bf16 drops its scale.
    The float32 weights and optimizer state carry over untouched."""
    def train(dtype, steps, *extra):
        run_train(["config/tiny.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
                   "--eval_interval=0", f"--dtype={dtype}", f"--max_iters={steps}", *extra])
        return capsys.readouterr().out
    train("bfloat16", 2)
    assert checkpoint.load_trainer_state(tmp_path)["state"]["scaler"] == {}
    out = train("float16", 4, "--init_from=resume")
    assert out.count("was trained in bfloat16 without loss scaling") == 1
    assert "fresh loss scale of 65536" in out and "resuming at step 2" in out
    state = checkpoint.load_trainer_state(tmp_path)["state"]
    assert state["dtype"] == "float16" and state["scaler"]["scale"] > 0
    out = train("bfloat16", 6, "--init_from=resume")
    assert out.count("was trained in float16: its loss scale is dropped") == 1
    assert checkpoint.load_trainer_state(tmp_path)["state"]["scaler"] == {}


def test_resume_with_another_optimizer_says_so(data_dir, tmp_path):
    """AdamW's state resumed under Muon: one line naming both, not DCP's 'missing key'."""
    argv = ["config/tiny.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
            "--eval_interval=0", "--optimizer=adamw"]
    run_train(argv + ["--max_iters=2"])
    with pytest.raises(ValueError, match="holds adamw optimizer state but this run uses muon"):
        run_train(argv + ["--max_iters=4", "--init_from=resume", "--optimizer=muon"])


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran while the checkpoint was read",))


def test_sharded_index_with_code_in_it_is_refused(tmp_path, capsys):
    """A sharded checkpoint's index (.metadata) is a pickle: one that would call a function when
    read is refused before torch's own plain pickle.load sees it."""
    import pickle
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(ValueError, match="builtins.print is not part of a checkpoint index"):
        checkpoint._shard_index(shards)
    assert "this ran" not in capsys.readouterr().out
