"""plan.py: the --plan table, the learning-rate schedules, the batch arithmetic, and the model a
train config describes."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch

import config
import llm
import plan
import train

ROOT = Path(__file__).resolve().parents[1]


def test_plan_prints_the_budget(capsys):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        train.main(["config/pretrain_1b.py", "--plan", "--plan_gpus=8"])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    cfg = config.parse_args(train.TrainConfig(), [str(ROOT / "config/pretrain_1b.py")],
                            config_file=True)
    with torch.device("meta"):
        n = llm.LLM(llm.model_config("1b")).num_params()
    tokens = cfg.max_iters * cfg.total_batch_tokens
    assert 18 <= tokens / n <= 22   # the config's budget: ~20 tokens per parameter
    assert f"{tokens / n:.1f} tokens per param" in out
    assert f"weights (fp32)              {4 * n / 1e9:10.1f}  {4 * n / 8 / 1e9:10.1f}" in out
    assert "predicted cost" in out and "x 8 GPUs x 4 accumulation steps" in out


def test_warmup_then_cosine():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lr = [plan.get_lr(s, cfg) for s in range(110)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)         # warmup
    assert lr[60] == pytest.approx(0.55)                                       # cosine midpoint
    assert lr[109] == pytest.approx(0.1, abs=1e-3)                             # end


def test_wsd_holds_then_decays():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110,
                            decay_frac=0.5, schedule="wsd")
    lr = [plan.get_lr(s, cfg) for s in range(110)]
    assert lr[20] == lr[54] == 1.0 and lr[55] == pytest.approx(1.0)
    assert lr[82] == pytest.approx(0.55, abs=0.02)


def test_grad_accum_keeps_the_global_batch():
    cfg = train.TrainConfig(batch_size=4, block_size=64, total_batch_tokens=512)
    assert [plan.grad_accum_steps(cfg, world) for world in (1, 2)] == [2, 1]
    with pytest.raises(ValueError, match="total_batch_tokens=512 is not a multiple"):
        plan.grad_accum_steps(cfg, 4)


def test_every_model_config_field_is_a_train_key_that_reaches_the_model():
    values = {"vocab_size": 600, "n_layer": 3, "n_head": 2, "n_kv_head": 1, "d_model": 32,
              "ffn_hidden": 96, "rope_theta": 5e5, "norm_eps": 1e-6, "max_seq_len": 128,
              "tie_embeddings": True}
    # a new ModelConfig field needs a value here (and so a check that it can be set)
    assert set(values) == {f.name for f in dataclasses.fields(llm.ModelConfig)}
    argv = ["--model=tiny"] + [f"--{k}={v}" for k, v in values.items()]
    mc = plan.model_config(config.parse_args(train.TrainConfig(), argv), vocab_size=300)
    assert {k: getattr(mc, k) for k in values} == values
    assert "task" not in {f.name for f in dataclasses.fields(train.TrainConfig)}


def test_model_keys_override_the_preset():
    cfg = config.parse_args(train.TrainConfig(), ["--model=tiny", "--rope_theta", "5e5",
                                                  "--norm_eps=1e-6", "--n_layer=3"])
    mc = plan.model_config(cfg, vocab_size=300)
    assert (mc.rope_theta, mc.norm_eps, mc.n_layer) == (5e5, 1e-6, 3)
    assert mc.d_model == llm.PRESETS["tiny"]["d_model"] and mc.vocab_size == 300


def test_vocab_size_below_the_tokenizers_is_refused():
    with pytest.raises(ValueError, match="vocab_size=200 is smaller than the tokenizer's 300"):
        plan.model_config(train.TrainConfig(model="tiny", vocab_size=200), vocab_size=300)
