"""optim.py's optimizer="muon": Muon on the hidden matrices and AdamW on the rest, checked against
torch's own Muon and AdamW; GradScaler through both; and through train.py: exact resume after
SIGKILL, DDP on 2 processes = one process, FSDP (resumed mid-run) = DDP.

The train.py runs reuse test_train.py's helpers (subprocesses, one thread each).
"""
import copy
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import checkpoint
import optim
import train
from conftest import run_train, tiny_model, word_corpus_shards
from test_train import args, assert_bitwise_equal, final_weights, finish, log_rows, spawn, wait_for

MUON = ("--optimizer=muon", "--muon_lr=0.02")
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return word_corpus_shards(tmp_path_factory.mktemp("optim_data"), 400, 80)


def muon_config():
    return train.TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02, weight_decay=0.1)


def test_muon_steps_the_hidden_matrices_and_adamw_the_rest():
    """Three steps with random gradients and a changing schedule lr, as the loop sets it: the same
    weights as torch.optim.Muon on the block matrices (lr = muon_lr/learning_rate x the schedule's,
    the same shrink per step) and torch.optim.AdamW on embeddings, lm_head and norms."""
    cfg = muon_config()
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = optim.make_optimizer(cfg, model)
    named = dict(model.named_parameters())
    muon_params = opt.muon.param_groups[0]["params"]
    in_muon = {n for n, p in named.items() if any(p is q for q in muon_params)}
    assert in_muon == {n for n in named if n.split(".")[-2] in HIDDEN}
    scale = cfg.muon_lr / cfg.learning_rate
    ref_named = dict(ref.named_parameters())
    ref_muon = torch.optim.Muon([ref_named[n] for n in sorted(in_muon)], lr=cfg.muon_lr,
                                weight_decay=cfg.weight_decay / scale)
    rest = [n for n in ref_named if n not in in_muon]
    ref_adamw = torch.optim.AdamW(
        [{"params": [ref_named[n] for n in rest if ref_named[n].dim() == 2], "weight_decay": 0.1},
         {"params": [ref_named[n] for n in rest if ref_named[n].dim() == 1], "weight_decay": 0.0}],
        betas=(cfg.beta1, cfg.beta2))
    g = torch.Generator().manual_seed(0)
    for lr in (1e-3, 6e-4, 2e-4):
        for name, p in named.items():
            p.grad = torch.randn(p.shape, generator=g)
            ref_named[name].grad = p.grad.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        ref_muon.param_groups[0]["lr"] = lr * scale
        for group in ref_adamw.param_groups:
            group["lr"] = lr
        train.gated_step(opt, torch.tensor(False))   # the loop's path: found_inf 0, not None
        ref_muon.step()
        ref_adamw.step()
    init = tiny_model().state_dict()
    for name, p in named.items():
        assert not torch.equal(p, init[name]), name
        torch.testing.assert_close(p, ref_named[name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("keys, words", [({"optimizer": "sgd"}, "optimizer='sgd' must be one of"),
                                         ({"learning_rate": 0.0}, "learning_rate > 0")])
def test_bad_optimizer_config_is_one_clear_error(keys, words):
    cfg = muon_config()
    for k, v in keys.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=words):
        optim.make_optimizer(cfg, tiny_model())


SHAPES = [(96, 64), (64, 160), (7, 5)]   # tall, wide, and rows that 2 ranks split unevenly (4 + 3)


def muon_steps(params, to_param=lambda t: t):
    """Two steps of kiln's Muon (lr_scale 2) on params with seeded gradients -> the params."""
    params = [torch.nn.Parameter(to_param(p)) for p in params]
    opt = optim.Muon(params, lr_scale=2.0, lr=0.01, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in params:
            p.grad = to_param(torch.randn(p.shape, generator=g))
        opt.step()
    return params


def sharded_muon(rank, world, port, out):
    """One rank of test_sharded_muon_equals_whole_muon: the matrices as row shards (as FSDP2)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    whole = [torch.randn(s, generator=g) for s in SHAPES]
    params = muon_steps(whole, lambda t: distribute_tensor(t, mesh, [Shard(0)]))
    assert all(p.to_local().shape[0] < p.shape[0] for p in params)   # really sharded
    gathered = [p.full_tensor() for p in params]
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_sharded_muon_equals_whole_muon(tmp_path):
    """Row-sharded DTensors on 2 gloo processes (what FSDP2 gives Muon) take bitwise the update of
    the whole matrices on one process: each matrix is orthogonalised whole."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(sharded_muon, args=(2, port, tmp_path / "sharded.pt"), nprocs=2)
    g = torch.Generator().manual_seed(0)
    whole = muon_steps([torch.randn(s, generator=g) for s in SHAPES])
    for a, b in zip(torch.load(tmp_path / "sharded.pt"), whole):
        assert torch.equal(a, b)


def test_grad_scaler_unscales_and_skips_both_optimizers():
    """fp16 loss scaling: a scaled step equals an unscaled one bitwise (the scale is a power of 2),
    and an inf gradient skips the whole step, Muon's part and AdamW's, and lowers the scale."""
    cfg = muon_config()
    model = tiny_model()
    twin = copy.deepcopy(model)
    opt = optim.make_optimizer(cfg, model)
    twin_opt = optim.make_optimizer(cfg, twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    scaler.scale(model(x, x)[1]).backward()
    scaler.unscale_(opt)   # as train.optimizer_step does, before clipping
    scaler.step(opt)
    scaler.update()
    twin(x, x)[1].backward()
    twin_opt.step()
    assert_bitwise_equal(model.state_dict(), twin.state_dict())
    before = copy.deepcopy(model.state_dict())
    scaler.scale(model(x, x)[1]).backward()
    model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert_bitwise_equal(model.state_dict(), before)
    assert scaler.get_scale() < 2.0 ** 10
    opt.zero_grad()
    scaler.scale(model(x, x)[1]).backward()
    with pytest.raises(RuntimeError, match="call scaler.unscale_"):   # scaled gradients: refused
        scaler.step(opt)


def test_muon_resume_after_sigkill_is_exact(data_dir, tmp_path):
    argv = args(data_dir, tmp_path / "killed", "--max_iters=16", "--ckpt_interval=4",
                "--eval_interval=0", *MUON)
    reference = args(data_dir, tmp_path / "reference", "--max_iters=16", "--ckpt_interval=16",
                     "--eval_interval=0", *MUON)
    finish(spawn(reference))
    proc = spawn(argv)
    wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "killed"), proc)
    proc.kill()   # SIGKILL: no chance to save anything
    proc.communicate()
    saved = [checkpoint._ckpt_step(p) for p in checkpoint.list_checkpoints(tmp_path / "killed")]
    assert saved and max(saved) < 16, saved
    assert f"resuming at step {max(saved)}" in finish(spawn(argv + ["--init_from=resume"]))
    assert_bitwise_equal(final_weights(tmp_path / "killed"), final_weights(tmp_path / "reference"))


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    """10 Muon steps on two processes (DDP, gloo, grad_accum 1)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    finish(spawn(args(data_dir, out_dir, "--max_iters=10", "--ckpt_interval=5",
                      "--eval_interval=0", *MUON), nproc=2))
    return out_dir


def assert_same_losses(out_dir, reference):
    loss = log_rows(out_dir, "loss")
    ref = log_rows(reference, "loss")
    assert sorted(loss) == sorted(ref) == list(range(1, 11))
    np.testing.assert_allclose([loss[s] for s in ref], list(ref.values()), rtol=1e-4)
    assert loss[10] < loss[1] - 0.5   # it trained


def test_muon_ddp_on_two_processes_equals_one(data_dir, tmp_path, ddp_run):
    """grad_accum 2 on one process and DDP over two see the same data: the same run."""
    run_train(args(data_dir, tmp_path, "--max_iters=10", "--ckpt_interval=5", "--eval_interval=0",
                   *MUON))
    assert_same_losses(tmp_path, ddp_run)
    w = final_weights(tmp_path)
    ref_w = final_weights(ddp_run)
    assert w.keys() == ref_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=0, atol=1e-5,
                                   msg=lambda m: f"{k}: {m}")


def test_muon_fsdp_resumed_mid_run_equals_ddp(data_dir, tmp_path, ddp_run):
    """FSDP2 on two processes, resumed at step 5 from its checkpoint (Muon's momentum re-sharded):
    DDP's losses. Only the losses: FSDP's gradients (reduce-scattered) differ from DDP's in the last
    bits, Newton-Schulz rounds them to bf16, and the weights drift apart by about one Muon update
    in a few elements (test_sharded_muon_equals_whole_muon checks the update itself exactly)."""
    argv = args(data_dir, tmp_path, "--max_iters=10", "--ckpt_interval=5", "--eval_interval=0",
                "--fsdp=True", *MUON)
    finish(spawn(argv, nproc=2))
    shutil.rmtree(tmp_path / "ckpt_0000010")
    assert "resuming at step 5" in finish(spawn(argv + ["--init_from=resume"], nproc=2))
    assert_same_losses(tmp_path, ddp_run)
