"""FSDP checkpoints are sharded (torch.distributed.checkpoint): resumed exactly after kill -9, each
process writes only its half, and whatever reads checkpoints puts them together in one process
(export to transformers, a one-process resume); a damaged shard is one clear error.

Two gloo processes through torchrun subprocesses, config/tiny.py, as in test_train.py.
"""
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers

import checkpoint
from conftest import run_train, word_corpus_shards
import export_hf
from test_train import args, assert_bitwise_equal, finish, final_weights, log_rows, spawn

STEPS = 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return word_corpus_shards(tmp_path_factory.mktemp("fsdp_data"), 400, 80)


def fsdp_args(data_dir, out_dir, *extra):
    return args(data_dir, out_dir, f"--max_iters={STEPS}", "--ckpt_interval=2",
                "--eval_interval=0", "--fsdp=True", *extra)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted FSDP run on 2 processes."""
    out_dir = tmp_path_factory.mktemp("fsdp_reference")
    finish(spawn(fsdp_args(data_dir, out_dir), nproc=2))
    return out_dir


def children(pid):
    """The processes whose parent is pid (torchrun's workers run in sessions of their own, so
    killing torchrun's process group would not reach them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:   # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_job(proc):
    """SIGKILL torchrun and its workers at once, as a lost machine would: nobody saves anything."""
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 30
    while any(alive(pid) for pid in workers):   # before anyone reads what they left
        assert time.time() < deadline, "a worker outlived SIGKILL"
        time.sleep(0.05)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"   # a zombie has exited; only its parent has not collected it yet


@pytest.fixture(scope="module")
def killed(data_dir, reference, tmp_path_factory):
    """The same run killed with SIGKILL after its first checkpoint -> (out_dir, steps saved)."""
    out_dir = tmp_path_factory.mktemp("fsdp_killed")
    proc = spawn(fsdp_args(data_dir, out_dir), nproc=2)
    t0 = time.time()
    while not checkpoint.list_checkpoints(out_dir):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - t0 < 120
        time.sleep(0.01)
    kill_job(proc)
    saved = [checkpoint._ckpt_step(p) for p in checkpoint.list_checkpoints(out_dir)]
    assert saved and max(saved) < STEPS, saved
    return out_dir, max(saved)


def test_resume_after_kill_is_bitwise_exact(data_dir, reference, killed, tmp_path):
    out_dir = tmp_path / "run"
    shutil.copytree(killed[0], out_dir)   # the killed run stays as it was for the next test
    # a save cut short (the kill rarely lands inside one): its folder is cleared by the next save
    shutil.copytree(checkpoint.list_checkpoints(out_dir)[-1], out_dir / ".tmp_ckpt_0000099")
    out = finish(spawn(fsdp_args(data_dir, out_dir, "--init_from=resume"), nproc=2))
    assert f"resuming at step {killed[1]}" in out
    assert not list(out_dir.glob(".tmp_ckpt_*"))   # a save cut short is cleared by the next
    assert_bitwise_equal(final_weights(out_dir), final_weights(reference))
    assert checkpoint.load_trainer_state(out_dir)["meta"]["sharded"]


def test_one_process_resumes_a_sharded_checkpoint(data_dir, reference, killed, tmp_path):
    """Without FSDP or a process group: the shards are read whole (weights and optimizer state),
    and the run continues as the FSDP one did, within float rounding (other summation order)."""
    out_dir = tmp_path / "run"
    shutil.copytree(killed[0], out_dir)
    argv = args(data_dir, out_dir, f"--max_iters={STEPS}", "--ckpt_interval=2",
                "--eval_interval=0", "--init_from=resume")
    run_train(argv)
    steps = range(killed[1] + 1, STEPS + 1)
    loss = log_rows(out_dir, "loss")
    ref = log_rows(reference, "loss")
    torch.testing.assert_close([loss[s] for s in steps], [ref[s] for s in steps], rtol=1e-4,
                               atol=0)
    assert not checkpoint.load_trainer_state(out_dir)["meta"]["sharded"]   # its own format
    w = final_weights(out_dir)
    ref_w = final_weights(reference)
    assert w.keys() == ref_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], atol=1e-5, rtol=0)


def test_each_process_writes_half(reference):
    """Each process's shard file holds about half of the weights and AdamW's two moments: no
    process writes (or gathers) the whole."""
    ckpt = checkpoint.list_checkpoints(reference)[-1]
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.pt").exists()
    model, _, _ = checkpoint.load_model(ckpt)
    whole = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    files = sorted((ckpt / checkpoint.SHARDS).glob("*.distcp"))
    assert [f.name for f in files] == ["__0_0.distcp", "__1_0.distcp"]
    for f in files:
        assert 0.45 < f.stat().st_size / whole < 0.65, (f.name, f.stat().st_size, whole)


def test_export_of_a_sharded_checkpoint_loads_in_transformers(reference, tmp_path):
    """export_hf.py puts the shards together: transformers' LlamaForCausalLM gives kiln's
    logits, and the exported tensors are the ones kiln reads from the shards."""
    ckpt = checkpoint.list_checkpoints(reference)[-1]
    out = export_hf.export(reference, tmp_path / "hf")
    model, _, _ = checkpoint.load_model(ckpt)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        want = model(idx)[0]
        got = hf(idx).logits
    assert (got - want).abs().max().item() <= 1e-4
    hf_weights = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert_bitwise_equal(hf_weights, final_weights(reference))


@pytest.mark.parametrize("damage, words", [
    ("truncate", r"__1_0\.distcp is truncated \([\d,]+ of [\d,]+ bytes\)"),
    ("delete", r"__0_0\.distcp is missing"),
    ("index", r"shards cannot be read \(UnpicklingError"),
])
def test_damaged_shards_give_one_clear_error(reference, tmp_path, damage, words):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint.list_checkpoints(reference)[-1], ckpt)
    shards = ckpt / checkpoint.SHARDS
    if damage == "truncate":
        f = shards / "__1_0.distcp"
        f.write_bytes(f.read_bytes()[:f.stat().st_size * 3 // 4])
    elif damage == "delete":
        (shards / "__0_0.distcp").unlink()
    else:
        f = shards / ".metadata"
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=words) as e:
        checkpoint.load_model(ckpt)
    assert "\n" not in str(e.value) and "copy the checkpoint again" in str(e.value)
