"""plan.py: the --plan table, the learning-rate schedules, the batch arithmetic, and the model a
train config describes."""
import dataclasses
import os
from functools import partial
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
    assert f"weights (fp32)                      {4 * n / 1e9:8.1f}  {4 * n / 8 / 1e9:8.1f}" in out
    # DDP's buckets: an fp32 copy of every gradient; FSDP's unsharded fp32 accumulation likewise
    assert f"grad buckets / FSDP accumulation    {4 * n / 1e9:8.1f}  {4 * n / 1e9:8.1f}" in out
    assert "predicted cost" in out and "x 8 GPUs x 4 accumulation steps" in out
    assert "compiled blocks" in out and "this config runs: DDP/8" in out


def test_plan_states_its_mode(capsys):
    cfg = config.parse_args(train.TrainConfig(), [str(ROOT / "config/pretrain_1b.py"),
                                                  "--compile=False", "--fsdp=True",
                                                  "--activation_checkpointing=True"],
                            config_file=True)
    plan.plan(cfg)
    out = capsys.readouterr().out
    mc = llm.model_config("1b")
    eager = plan.activation_bytes_per_token(mc, compiled=False)
    assert f"eager blocks ({eager / 1e3:.0f} KB per token per layer" in out
    assert "this config runs: FSDP + act. ckpt" in out


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


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone: enough for parallel.wrap_model to build DDP and
    FSDP2 as a run of several processes would."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_the_planners_ddp_buckets_are_parallel_pys(one_process_group):
    """plan.DDP_GRADIENT_AS_BUCKET_VIEW says what parallel.wrap_model gives DDP."""
    import parallel
    cfg = train.TrainConfig(model="tiny", compile=False)
    model = llm.LLM(llm.model_config("tiny"))
    ddp = parallel.wrap_model(cfg, model, torch.float32, torch.device("cpu"), 2)[0]
    assert ddp.gradient_as_bucket_view == plan.DDP_GRADIENT_AS_BUCKET_VIEW


def test_fsdp_accumulates_unsharded_fp32_gradients_as_planned(one_process_group):
    """On a micro-step without the reduce-scatter, parallel.py's FSDP2 (bf16 weights, fp32
    reduction) keeps an unsharded fp32 gradient of every parameter: the planner's row."""
    import parallel
    cfg = train.TrainConfig(model="tiny", compile=False, fsdp=True, batch_size=2, block_size=16,
                            total_batch_tokens=64)
    model = llm.LLM(llm.model_config("tiny"))
    _, set_grad_sync, _ = parallel.wrap_model(cfg, model, torch.bfloat16, torch.device("cpu"), 1)
    set_grad_sync(False)
    x = torch.randint(0, 512, (2, 16))
    model(x, x)[1].backward()
    kept = sum(fsdp_param.unsharded_accumulated_grad.nbytes
               for m in model.modules() if hasattr(m, "_get_fsdp_state")
               for group in [m._get_fsdp_state()._fsdp_param_group] if group
               for fsdp_param in group.fsdp_params)
    rows = {name: sharded for name, _, sharded in plan.memory_rows(cfg, model, 1, compiled=True)}
    assert plan.grad_accum_steps(cfg, 1) == 2
    assert kept == rows["grad buckets / FSDP accumulation"] == 4 * model.num_params()


def saved_bytes(block, mc, T, params=None):
    """Bytes autograd keeps for backward from one bf16-autocast forward of block (a Block, or a
    function of one with its params) over (1, T) tokens -> (per token, bf16 weight copies): each
    saved storage once, the parameters left out, autocast's bf16 copies of them (told apart by
    their shape) counted separately."""
    params = list(block.parameters() if params is None else params)
    weight_shapes = {tuple(sorted(p.shape)) for p in params if p.dim() == 2}
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved = {}
    alive = []   # held here too, so that no freed storage's address is reused and counted twice

    @torch.compiler.disable   # a hook, run by autograd: not part of the compiled block
    def pack(t):
        storage = t.untyped_storage()
        alive.append(t)
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = (storage.nbytes(), tuple(sorted(t.shape)) in weight_shapes)
        return t
    torch.manual_seed(0)
    x = torch.randn(1, T, mc.d_model, requires_grad=True)
    cos, sin = llm.rope_cos_sin(torch.arange(T)[None], mc.head_dim, mc.rope_theta)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block(x, cos, sin)
    per_token = sum(n for n, is_weight in saved.values() if not is_weight) / T
    return per_token, sum(n for n, is_weight in saved.values() if is_weight)


@pytest.fixture(scope="module")
def block_1b():
    mc = llm.model_config("1b")
    torch.manual_seed(0)
    return mc, llm.Block(mc)


def test_eager_activations_per_token_match_the_planner(block_1b):
    mc, block = block_1b
    per_token, copies = saved_bytes(block, mc, 256)
    assert per_token == pytest.approx(plan.activation_bytes_per_token(mc, compiled=False), rel=0.15)
    # the attention saves its output and log-sum-exp, no (T, T) matrix: bytes per token do not
    # grow with T (only cos/sin, shared by the batch, and such are not per row)
    assert saved_bytes(block, mc, 128)[0] == pytest.approx(per_token, rel=0.01)
    # autocast's bf16 copies of all the block's matrices stay until backward: the planner's row
    cfg = train.TrainConfig(model="1b", batch_size=1, block_size=256, total_batch_tokens=256)
    with torch.device("meta"):
        model = llm.LLM(mc)
    rows = {name: rep for name, rep, _ in plan.memory_rows(cfg, model, 1, compiled=False)}
    assert copies * mc.n_layer == rows["bf16 weight copies"]


def test_compiled_activations_per_token_match_the_planner(block_1b):
    mc, block = block_1b
    per_token, copies = saved_bytes(torch.compile(block, fullgraph=True), mc, 256)
    assert per_token == pytest.approx(plan.activation_bytes_per_token(mc, compiled=True), rel=0.15)
    assert per_token < 0.75 * plan.activation_bytes_per_token(mc, compiled=False)
    assert copies == 2 * sum(p.numel() for p in block.parameters() if p.dim() == 2)


def test_a_checkpointed_block_keeps_its_input(block_1b):
    """Activation checkpointing: the planner counts each block's fp32 input, 4 * d_model per token
    (the rotary cos/sin, also saved here, are one pair for all blocks)."""
    from torch.utils.checkpoint import checkpoint
    mc, block = block_1b
    per_token, copies = saved_bytes(partial(checkpoint, block, use_reentrant=False), mc, 256,
                                    params=block.parameters())
    assert per_token == pytest.approx(4 * mc.d_model, rel=0.15) and copies == 0


def test_the_loss_tail_keeps_what_the_planner_counts():
    """The final norm and LLM.loss at the 1b width (a vocabulary of 4096, for speed): what autograd
    keeps for backward, per position (from 128 and 256 positions) and for lm_head, against
    plan.loss_tail_bytes's kept part."""
    mc = llm.model_config("1b", n_layer=1, vocab_size=4096)
    with torch.device("meta"):   # only the norm and lm_head run: the rest needs no memory
        model = llm.LLM(mc)
    model.norm.to_empty(device="cpu").weight.data.fill_(1.0)
    torch.manual_seed(0)
    model.lm_head.to_empty(device="cpu").weight.data.normal_(0, 0.02)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def kept(T):
        saved = {}
        alive = []   # as in saved_bytes

        def pack(t):
            alive.append(t)
            if t.untyped_storage().data_ptr() not in param_storages:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(1, T, mc.d_model, requires_grad=True)
        targets = torch.randint(0, mc.vocab_size, (1, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model.loss(model.norm(x), targets, reduction="sum")
        return sum(saved.values())
    per_token = (kept(256) - kept(128)) / 128
    planned = {T: plan.loss_tail_bytes(mc, T)[0] for T in (128, 256)}
    assert per_token == pytest.approx((planned[256] - planned[128]) / 128, rel=0.15)
    assert kept(128) == pytest.approx(planned[128], rel=0.15)
