"""train.train_step, called directly on a tiny model: its loss and every gradient against one plain
forward/backward over all micro-batches at once (F.cross_entropy, mean over the counted targets).

Pretraining counts every target (the denominator is total_batch_tokens); SFT counts the learned
ones on all micro-batches and processes, so a micro-batch of 3 answer tokens does not weigh as
much as one of 30. The SFT step is checked on one process and on two (gloo DDP).
"""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import conftest
import optim
import tasks
import train

ROOT = Path(__file__).resolve().parents[1]
V = 300
T = 32


def tiny_model(seed=0):
    return conftest.tiny_model(seed, vocab_size=V)


def pretrain_batch(seed, B=2):
    """(x, y, None): B rows of random tokens, every target counted."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(5, V, (2, B, T), generator=g)
    return x, y, None


def sft_batch(seed, n_learned):
    """(x, y, doc_ids) of one row with exactly n_learned targets; two documents in the row."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(5, V, (2, 1, T), generator=g)
    learned = torch.zeros(T, dtype=torch.bool)
    learned[torch.randperm(T, generator=g)[:n_learned]] = True
    doc_ids = (torch.arange(T) >= T // 3).long()[None]
    return x, y.masked_fill(~learned[None], -1), doc_ids


SFT_BATCHES = [sft_batch(1, 3), sft_batch(2, 30)]   # 3 vs 30 learned tokens


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def reference(model, batches):
    """One forward over all micro-batches' rows, mean cross-entropy over the targets != -1."""
    model.zero_grad()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    doc_ids = None if batches[0][2] is None else torch.cat([b[2] for b in batches])
    logits, _ = model(x, doc_ids=doc_ids)                                       # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    loss.backward()
    return loss.item(), grads(model)


def assert_same_grads(got, ref):
    assert got.keys() == ref.keys()
    for k, g in got.items():
        torch.testing.assert_close(g, ref[k], rtol=1e-5, atol=1e-7)


def test_pretrain_step_loss_and_grads():
    model = tiny_model()
    batches = [pretrain_batch(1), pretrain_batch(2)]
    ref_loss, ref = reference(model, batches)
    model.zero_grad()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = tasks.Pretrain(train.TrainConfig(total_batch_tokens=2 * 2 * T))
    loss = train.train_step(model, batches, stage.n_tokens(batches))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert_same_grads(grads(model), ref)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # no update yet


def test_sft_step_weighs_every_learned_token_once():
    model = tiny_model()
    ref_loss, ref = reference(model, SFT_BATCHES)
    model.zero_grad()
    stage = tasks.SFT(train.TrainConfig(stage="sft"))
    loss = train.train_step(model, SFT_BATCHES, stage.n_tokens(SFT_BATCHES))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert_same_grads(grads(model), ref)


def test_mean_of_micro_batch_means_differs():
    """The SFT reference can tell: averaging the two micro-batch means gives another gradient."""
    model = tiny_model()
    _, ref = reference(model, SFT_BATCHES)
    model.zero_grad()
    for x, y, d in SFT_BATCHES:
        (model(x, y, doc_ids=d)[1] / 2).backward()
    assert max((p.grad - ref[k]).abs().max().item() for k, p in model.named_parameters()) > 1e-3


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import llm, tasks, train
dist.init_process_group("gloo")
rank = dist.get_rank()
saved = torch.load({inputs!r})
model = llm.LLM(llm.model_config("tiny", vocab_size={vocab}))
model.load_state_dict(saved["weights"])
ddp = torch.nn.parallel.DistributedDataParallel(model)
batches = [saved["batches"][rank]]
n_tokens = tasks.SFT(train.TrainConfig(stage="sft")).n_tokens(batches)   # all-reduced over ranks
loss = train.train_step(ddp, batches, n_tokens, world_size=2)
if rank == 0:
    grads = {{n: p.grad for n, p in model.named_parameters()}}
    torch.save({{"loss": loss, "grads": grads}}, {out!r})
dist.destroy_process_group()
"""


def test_sft_step_on_two_processes(tmp_path):
    """Each of 2 processes (gloo DDP) holds one micro-batch: the same loss and gradient as one
    process holding both."""
    model = tiny_model()
    torch.save({"weights": model.state_dict(), "batches": SFT_BATCHES}, tmp_path / "inputs.pt")
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), inputs=str(tmp_path / "inputs.pt"),
                                        out=str(tmp_path / "out.pt"), vocab=V))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    ref_loss, ref = reference(model, SFT_BATCHES)
    assert got["loss"].item() == pytest.approx(ref_loss, rel=1e-5)
    assert_same_grads(got["grads"], ref)


# ---- The update: skipped on the device when the loss or the gradient norm is not finite
def adamw_after_one_step(fused):
    """A tiny model, one AdamW step taken (so both moments and the step count hold values), and
    NaN gradients for the next -> (model, optimizer)."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    model(*pretrain_batch(1)[:2])[1].backward()
    opt.step()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    return model, opt


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [v.clone() for s in opt.state.values() for v in s.values()])


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


@pytest.mark.parametrize("fused", [True, False])   # fused: on the device; else skip is read
def test_gated_step_skips_exactly(fused):
    """skip=True leaves the weights, both moments and the step count bitwise as they were;
    skip=False steps (with NaN gradients: the weights turn NaN, so the gate is what kept them)."""
    model, opt = adamw_after_one_step(fused)
    before = snapshot(model, opt)
    train.gated_step(opt, torch.tensor(True))
    assert same(snapshot(model, opt), before)
    train.gated_step(opt, torch.tensor(False))
    assert not same(snapshot(model, opt), before)
    assert all(torch.isnan(p).all() for p in model.parameters())


def test_gated_step_skips_muon_exactly(monkeypatch):
    """Muon + AdamW take the flag on the device too (no .item()): a skipped step leaves weights,
    Muon's momentum and AdamW's moments and step count bitwise as they were."""
    model = tiny_model()
    cfg = SimpleNamespace(optimizer="muon", learning_rate=1e-2, muon_lr=0.02, weight_decay=0.1,
                          beta1=0.9, beta2=0.95)
    opt = optim.make_optimizer(cfg, model)
    model(*pretrain_batch(1)[:2])[1].backward()
    opt.step()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))

    def state():
        return ([p.detach().clone() for p in model.parameters()],
                [v.clone() for o in opt for s in o.state.values() for v in s.values()])
    before = state()
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("the skip flag was read"))
    train.gated_step(opt, torch.tensor(True))
    assert same(state(), before)
    train.gated_step(opt, torch.tensor(False))
    assert all(torch.isnan(p).all() for p in model.parameters())


def test_nonfinite_loss_is_a_bad_step():
    """optimizer_step: a NaN loss is a bad step and skips the update (fused AdamW, no host read)."""
    model, opt = adamw_after_one_step(fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)     # finite gradients: the loss alone decides
    before = snapshot(model, opt)
    run = SimpleNamespace(optimizer=opt, raw_model=model, cfg=SimpleNamespace(grad_clip=1.0),
                          scaler=torch.amp.GradScaler("cpu", enabled=False))
    norm, bad = train.optimizer_step(run, torch.tensor(float("nan")))
    assert bad.item() and same(snapshot(model, opt), before)
    assert norm.item() == pytest.approx(sum(p.numel() for p in model.parameters()) ** 0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    norm, bad = train.optimizer_step(run, torch.tensor(2.0))
    assert not bad.item() and not same(snapshot(model, opt), before)


FP16_FSDP_SCRIPT = """
import sys, types, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
import llm, train
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = llm.LLM(llm.model_config("tiny", vocab_size={vocab}))
mp = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
for block in model.layers:
    fully_shard(block, mp_policy=mp)
fully_shard(model, mp_policy=mp)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
run = types.SimpleNamespace(optimizer=opt, scaler=scaler, raw_model=model,
                            cfg=types.SimpleNamespace(grad_clip=1.0))
g = torch.Generator().manual_seed(rank)
x, y = torch.randint(5, {vocab}, (2, 2, {T}), generator=g)
shard = lambda t: t.to_local() if hasattr(t, "to_local") else t   # the step count: a tensor
local = lambda: [shard(t).clone() for t in list(model.parameters()) +
                 [v for s in opt.state.values() for v in s.values()]]
rows = []
for poison in (False, True, False):
    loss = train.train_step(model, [(x, y, None)], 2 * 2 * {T}, world_size=2,
                            autocast=torch.autocast("cpu", dtype=torch.float16), scaler=scaler)
    if poison and rank == 1:   # an inf in one element of rank 1's gradient shard only
        shard(next(model.parameters()).grad).view(-1)[0] = float("inf")
    before = local()
    norm, bad = train.optimizer_step(run, loss)
    after = local()
    changed = len(before) != len(after) or not all(map(torch.equal, before, after))
    step_count = float(next(iter(opt.state.values()))["step"])
    rows.append((changed, bool(bad), scaler.get_scale(), step_count))
torch.save(rows, {out!r}.format(rank))
dist.destroy_process_group()
"""


def test_fp16_inf_on_one_rank_skips_the_step_on_both(tmp_path):
    """FSDP2 (gloo, 2 processes) in fp16: an inf in rank 1's gradient shard alone makes both ranks
    skip the step (weights, moments and step count unchanged) and halve the same loss scale; it is
    the scaler's business, not a bad step. The steps before and after update on both."""
    script = tmp_path / "fp16_fsdp.py"
    script.write_text(FP16_FSDP_SCRIPT.format(root=str(ROOT), vocab=V, T=T,
                                              out=str(tmp_path / "rank{}.pt")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0 == rank1
    assert rank0 == [(True, False, 1024.0, 1.0), (False, False, 512.0, 1.0),
                     (True, False, 512.0, 2.0)]
