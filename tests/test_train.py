"""train.py end to end: 1 vs 2 processes agree, exact resume after SIGKILL/SIGTERM, learning, clear
errors, non-finite steps skipped, the loss plot.

Data is made here: a tokenizer trained on text this file writes, shards from data.py. Runs that must
be killed or need torchrun are subprocesses (one thread each, so two runs do the same arithmetic).
The training step itself is tested in test_train_step.py, the planner in test_plan.py.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import bpe
import checkpoint
from conftest import WORDS, run_train, word_corpus_shards
import data
import llm
import loader
import runlog
import shards

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small corpus of made-up sentences -> tokenizer (vocab 300) -> train/val shards."""
    return word_corpus_shards(tmp_path_factory.mktemp("train_data"), 400, 80)


def args(data_dir, out_dir, *extra):
    return ["config/tiny.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra]


def spawn(argv, nproc=1):
    launcher = []
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen([sys.executable, *launcher, "train.py", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def log_rows(out_dir, key):
    rows = [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]
    return {r["step"]: r[key] for r in rows if key in r}


def final_weights(out_dir):
    """The newest checkpoint's weights, whole: model.safetensors, or put together from FSDP shards."""
    return checkpoint.read_weights(checkpoint.list_checkpoints(out_dir)[-1])[0]


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    """10 steps on one process (grad_accum 2), checkpoints at 5 and 10."""
    out_dir = tmp_path_factory.mktemp("single")
    run_train(args(data_dir, out_dir, "--max_iters=10", "--ckpt_interval=5"))
    return out_dir


def assert_same_run(out_dir, reference, steps):
    loss, ref = log_rows(out_dir, "loss"), log_rows(reference, "loss")
    np.testing.assert_allclose([loss[s] for s in steps], [ref[s] for s in steps], rtol=1e-4)
    w, ref_w = final_weights(out_dir), final_weights(reference)
    assert w.keys() == ref_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], atol=1e-5, rtol=0)


def test_one_process_equals_two(data_dir, tmp_path, single_run):
    """grad_accum 2 on one process and grad_accum 1 on two (DDP, gloo) see the same data: the same
    run."""
    out = finish(spawn(args(data_dir, tmp_path, "--max_iters=10", "--ckpt_interval=5"), nproc=2))
    assert "2 process(es)" in out and "1 micro-steps" in out
    assert sorted(log_rows(tmp_path, "loss")) == list(range(1, 11))
    assert_same_run(tmp_path, single_run, range(1, 11))
    loss = log_rows(single_run, "loss")
    assert loss[10] < loss[1] - 0.5  # it trained
    # eval covers the same windows too
    np.testing.assert_allclose(log_rows(tmp_path, "val_loss")[10],
                               log_rows(single_run, "val_loss")[10], rtol=1e-4)


def test_fsdp_with_activation_checkpointing_resumes_to_the_same_run(data_dir, tmp_path, single_run):
    """FSDP2 + activation checkpointing on 2 processes, resumed from step 5 (sharded optimizer state
    reloaded from the gathered checkpoint): the same losses and weights as one plain process."""
    argv = args(data_dir, tmp_path, "--max_iters=10", "--ckpt_interval=5", "--eval_interval=0",
                "--fsdp=True", "--activation_checkpointing=True")
    finish(spawn(argv, nproc=2))
    shutil.rmtree(tmp_path / "ckpt_0000010")
    assert "resuming at step 5" in finish(spawn(argv + ["--init_from=resume"], nproc=2))
    assert_same_run(tmp_path, single_run, range(1, 11))


def test_resume_does_not_repeat_the_eval_it_saved_after(data_dir, tmp_path):
    """The checkpoint at step 4 is written right after step 4's eval: resuming from it evaluates 6
    and 8, not 4 again (a second full eval and a duplicate log row per resume)."""
    argv = args(data_dir, tmp_path, "--max_iters=8", "--ckpt_interval=4", "--eval_interval=2")
    run_train(argv)
    shutil.rmtree(tmp_path / "ckpt_0000008")
    run_train(argv + ["--init_from=resume"])
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    evals = [r["step"] for r in rows if "val_loss" in r]
    assert evals == [0, 2, 4, 6, 8, 6, 8]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """An uninterrupted 30-step run (subprocess, like the interrupted ones)."""
    out_dir = tmp_path_factory.mktemp("reference")
    finish(spawn(args(data_dir, out_dir, "--max_iters=30", "--ckpt_interval=5",
                      "--eval_interval=0")))
    return final_weights(out_dir)


def wait_for(condition, proc, timeout=120):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_sigkill_is_exact(data_dir, tmp_path, reference_run):
    argv = args(data_dir, tmp_path, "--max_iters=30", "--ckpt_interval=5", "--eval_interval=0")
    proc = spawn(argv)
    wait_for(lambda: checkpoint.list_checkpoints(tmp_path), proc)
    proc.kill()   # SIGKILL: no chance to save anything
    proc.communicate()
    saved = [checkpoint._ckpt_step(p) for p in checkpoint.list_checkpoints(tmp_path)]
    assert saved and max(saved) < 30, saved
    out = finish(spawn(argv + ["--init_from=resume"]))
    assert f"resuming at step {max(saved)}" in out
    assert_bitwise_equal(final_weights(tmp_path), reference_run)


def test_resume_after_sigterm_mid_run_is_exact(data_dir, tmp_path, reference_run):
    argv = args(data_dir, tmp_path, "--max_iters=30", "--ckpt_interval=5", "--eval_interval=0")
    proc = spawn(argv)
    log = tmp_path / "log.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 7, proc)
    proc.send_signal(signal.SIGTERM)   # lands in a step, which finishes, is saved; the run exits
    out = finish(proc)
    assert "signal" in out and "continue with --init_from=resume" in out
    stopped_at = checkpoint._ckpt_step(checkpoint.list_checkpoints(tmp_path)[-1])
    assert 7 <= stopped_at < 30
    out = finish(spawn(argv + ["--init_from=resume"]))
    assert f"resuming at step {stopped_at}" in out
    assert_bitwise_equal(final_weights(tmp_path), reference_run)


def test_tiny_overfits_one_batch(data_dir, tmp_path):
    """The whole train split is one batch of random tokens (8 windows): the model memorises it."""
    d = tmp_path / "one_batch"
    d.mkdir()
    tok = bpe.Tokenizer.load(data_dir)
    tok.save(d)
    tokens = np.random.default_rng(0).integers(len(bpe.SPECIAL_TOKENS), tok.vocab_size, 8 * 64 + 1)
    for split in ("train", "val"):
        shards.write_shard(d / f"{split}_000000.bin", tokens, tok.vocab_size, tok.hash)
    run_train(args(d, tmp_path / "run", "--max_iters=150", "--learning_rate=1e-2",
                        "--min_lr=1e-3", "--eval_interval=150", "--ckpt_interval=0"))
    loss = log_rows(tmp_path / "run", "loss")
    assert loss[1] > 5.0 and loss[150] < 0.05, (loss[1], loss[150])
    assert log_rows(tmp_path / "run", "val_loss")[150] < 0.05


def test_demo_config_lowers_val_bpb_on_shakespeare(shared_data, tmp_path):
    """The demo model on real text: bits per byte on held-out Shakespeare fall in a few steps."""
    bpe.train([str(shared_data / "tinyshakespeare.txt")], 512, tmp_path / "tok")
    data.prepare([str(shared_data / "tinyshakespeare.txt")], tmp_path / "tok", tmp_path / "d",
                 txt_separator="\n\n", val_fraction=0.05, workers=1)
    run_train(["config/demo.py", f"--data_dir={tmp_path / 'd'}",
                    f"--out_dir={tmp_path / 'run'}", "--max_iters=12", "--eval_interval=12",
                    "--eval_iters=1", "--warmup_iters=2", "--batch_size=4", "--block_size=128",
                    "--total_batch_tokens=512", "--n_layer=2"])
    bpb = log_rows(tmp_path / "run", "val_bpb")
    assert bpb[12] < bpb[0] - 0.3, bpb


def test_mixture_reports_each_source(data_dir, tmp_path):
    """data_dir 'a:0.7,b:0.3': both sources are trained on, each gets its own val loss and bpb."""
    rng = random.Random(1)
    with open(tmp_path / "raw.jsonl", "w") as f:   # another distribution: only a few of the words
        for _ in range(100):
            words = " ".join(rng.choice(WORDS[:6]) for _ in range(60))
            f.write(json.dumps({"text": words}) + "\n")
    data.prepare([str(tmp_path / "raw.jsonl")], data_dir, tmp_path / "other", val_fraction=0.2,
                 workers=1)
    run_train(args(f"{data_dir}:0.7,{tmp_path / 'other'}:0.3", tmp_path / "run",
                        "--max_iters=2", "--eval_interval=2"))
    row = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")][-1]
    a, b = row[f"val_loss/{data_dir.name}"], row["val_loss/other"]
    assert a != b and row["val_loss"] == pytest.approx((a + b) / 2)
    assert row[f"val_bpb/{data_dir.name}"] > 0 and row["val_bpb/other"] > 0
    state = checkpoint.load_trainer_state(tmp_path / "run")["state"]["data"]
    assert sum(state["counts"]) == 2 * 8   # 2 steps x 8 windows
    assert min(state["counts"]) > 0          # from both sources


@pytest.mark.parametrize("extra, error, words", [
    (["--lerning_rate=1e-3"], ValueError, "unknown config key 'lerning_rate'"),
    (["--total_batch_tokens=500"], ValueError, "total_batch_tokens=500 is not a multiple"),
    (["--block_size=256", "--total_batch_tokens=2048"], ValueError,
     "block_size=256 exceeds the model's max_seq_len"),
    (["--stage=finetune"], ValueError, "stage='finetune' must be one of pretrain, sft"),
    (["--rope_theta=abc"], ValueError, "could not parse --rope_theta=abc"),
])
def test_bad_config_fails_before_training(data_dir, tmp_path, extra, error, words):
    with pytest.raises(error, match=words):
        run_train(args(data_dir, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_data_dir_without_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no train_.*bin.*python data.py"):
        run_train(args(tmp_path / "empty", tmp_path / "run"))


def test_resume_with_another_model_shape(data_dir, tmp_path):
    run_train(args(data_dir, tmp_path, "--max_iters=1", "--eval_interval=0"))
    with pytest.raises(ValueError, match="another model shape: n_layer=2 .config: 3"):
        run_train(args(data_dir, tmp_path, "--max_iters=2", "--init_from=resume",
                            "--n_layer=3"))


def test_cli_error_is_one_line(data_dir, tmp_path):
    argv = args(data_dir, tmp_path, "--total_batch_tokens=500")
    proc = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: total_batch_tokens=500"), proc.stderr


def test_space_separated_values_work(data_dir, tmp_path):
    """`--max_iters 2` is `--max_iters=2` on train.py as on every script."""
    run_train(["config/tiny.py", "--data_dir", str(data_dir), "--out_dir", str(tmp_path),
                    "--max_iters", "2", "--eval_interval", "0"])
    assert sorted(log_rows(tmp_path, "loss")) == [1, 2]


def test_rope_theta_is_a_config_key(data_dir, tmp_path):
    """Every llm.ModelConfig field is a train.py key: the checkpoint holds the model asked for."""
    run_train(args(data_dir, tmp_path, "--max_iters=1", "--eval_interval=0",
                        "--rope_theta=5e5", "--norm_eps=1e-6"))
    _, _, meta = checkpoint.load_model(tmp_path)
    assert meta["model_config"]["rope_theta"] == 5e5 and meta["model_config"]["norm_eps"] == 1e-6
    assert meta["run_config"]["stage"] == "pretrain" and "task" not in meta["run_config"]


def test_loss_png_is_drawn_at_the_end(data_dir, tmp_path):
    run_train(args(data_dir, tmp_path, "--max_iters=2", "--eval_interval=0"))
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_failed_plot_does_not_fail_the_run(data_dir, tmp_path, monkeypatch, capsys):
    """A picture that cannot be drawn costs one printed line, never the run after its checkpoint."""
    def broken(*a, **k):
        raise RuntimeError("no fonts")
    monkeypatch.setattr(runlog, "plot_losses", broken)
    run_train(args(data_dir, tmp_path, "--max_iters=2", "--eval_interval=0"))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_0000002"]
    assert "loss.png not drawn (RuntimeError: no fonts)" in capsys.readouterr().out


def test_missing_plot_library_does_not_fail_the_run(data_dir, tmp_path, monkeypatch, capsys):
    """Without matplotlib (or the Pillow it needs) the run still ends with its checkpoint and
    exit 0: the picture costs one line (issue 14)."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # the import fails
    run_train(args(data_dir, tmp_path, "--max_iters=2", "--eval_interval=0"))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_0000002"]
    assert "loss.png not drawn (ModuleNotFoundError" in capsys.readouterr().out
    assert not (tmp_path / "loss.png").exists()


# ---- Non-finite steps, from poisoned data: no patching of the model
def poisoned_run(data_dir, tmp_path, bad_steps, n_windows=200):
    """-> a data dir and an initial checkpoint such that exactly the steps in bad_steps (1-based)
    have a NaN loss: the checkpoint's embedding row of one token is NaN, and that token occurs only
    in the windows those steps read (config/tiny.py: 8 windows of 64 tokens per step, 1 process)."""
    tok = bpe.Tokenizer.load(data_dir)
    poison = tok.vocab_size - 1
    scan = tmp_path / "scan"   # the clean tokens, read once to learn which windows each step reads
    d = tmp_path / "poisoned"  # another path: the loader keeps the shards it opened memory-mapped
    for folder in (scan, d):
        folder.mkdir()
        tok.save(folder)
    rng = np.random.default_rng(0)
    tokens = rng.integers(len(bpe.SPECIAL_TOKENS), poison, n_windows * 64 + 1)  # never `poison`
    shards.write_shard(scan / "train_000000.bin", tokens, tok.vocab_size, tok.hash)
    start_of = {tokens[i * 64:i * 64 + 64].tobytes(): i * 64 for i in range(n_windows)}
    train_loader = loader.PretrainLoader(str(scan), "train", 4, 64, seed=1337)
    for step in range(1, max(bad_steps) + 1):
        for _ in range(2):   # grad_accum 2
            x = next(train_loader)[0].numpy()
            if step in bad_steps:
                for row in x:
                    tokens[start_of[row.tobytes()] + 32] = poison   # mid-window
    for split in ("train", "val"):
        shards.write_shard(d / f"{split}_000000.bin", tokens, tok.vocab_size, tok.hash)
    torch.manual_seed(0)
    model = llm.LLM(llm.model_config("tiny", vocab_size=tok.vocab_size, max_seq_len=128))
    with torch.no_grad():
        model.embed_tokens.weight[poison] = float("nan")
    checkpoint.save_checkpoint(tmp_path / "init", 0, model, {}, {}, {}, tok)
    return d, tmp_path / "init", poison


def finite_except(model, poison):
    """Every weight finite but the poisoned embedding row, which is still NaN (never updated)."""
    params = dict(model.named_parameters())
    emb = params.pop("embed_tokens.weight")
    rows = torch.ones(emb.shape[0], dtype=torch.bool)
    rows[poison] = False
    return (all(torch.isfinite(p).all() for p in params.values())
            and torch.isfinite(emb[rows]).all() and torch.isnan(emb[poison]).all())


def test_nonfinite_step_is_skipped(data_dir, tmp_path, capsys):
    """Step 3 is bad: it is reported at the next read (step 4, a log step), the run goes on."""
    d, init, poison = poisoned_run(data_dir, tmp_path, bad_steps={3})
    model = run_train(args(d, tmp_path / "run", f"--init_from={init}", "--max_iters=6",
                           "--eval_interval=0", "--log_interval=4"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in rows if "skipped" in r] == [3]
    loss = log_rows(tmp_path / "run", "loss")
    assert sorted(loss) == [4] and np.isfinite(loss[4])   # the run went on
    assert finite_except(model, poison)   # NaN never reached the weights
    assert "step 3: skipped" in capsys.readouterr().out


def test_skipped_step_changes_no_weight_and_no_optimizer_state(data_dir, tmp_path):
    """The checkpoints before and after a skipped step are bitwise equal: weights, both AdamW
    moments and the step count (a device-side gate, no host read)."""
    d, init, _ = poisoned_run(data_dir, tmp_path, bad_steps={3})
    run = tmp_path / "run"
    run_train(args(d, run, f"--init_from={init}", "--max_iters=3", "--ckpt_interval=2",
                   "--eval_interval=0"))
    before, after = (load_file(run / f"ckpt_000000{s}" / "model.safetensors") for s in (2, 3))
    assert_same_bits(before, after)   # the poisoned embedding row is NaN in both
    opt2, opt3 = (checkpoint.load_trainer_state(run / f"ckpt_000000{s}")["optimizer"]["state"]
                  for s in (2, 3))
    assert opt2.keys() == opt3.keys() and opt2
    for k in opt2:
        assert_same_bits(opt2[k], opt3[k])
    assert {float(v["step"]) for v in opt3.values()} == {2.0}


def assert_same_bits(a, b):
    """Like assert_bitwise_equal, NaN included: the tensors' bytes are compared."""
    assert a.keys() == b.keys()
    for k in a:
        bits = [t[k].reshape(-1).view(torch.uint8) for t in (a, b)]
        assert torch.equal(*bits), k


def test_nonfinite_steps_in_a_row_stop_the_run(data_dir, tmp_path):
    """Steps 5.. are bad and max_bad_steps=3. Step 5 is not read (reads: every 3 steps and at
    checkpoints, every 2); step 6 is, and from then on every step: the run stops at step 7, the 3rd
    bad step in a row, as if every step had been read, and names the first."""
    d, init, poison = poisoned_run(data_dir, tmp_path, bad_steps=set(range(5, 11)))
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="3 non-finite steps in a row, from step 5 to 7 .*last "
                                         "good checkpoint is .*ckpt_0000004"):
        run_train(args(d, run, f"--init_from={init}", "--max_iters=10", "--ckpt_interval=2",
                       "--max_bad_steps=3", "--eval_interval=0", "--log_interval=0"))
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in rows if "skipped" in r] == [5, 6, 7]
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["ckpt_0000002", "ckpt_0000004"]
    model, _, meta = checkpoint.load_model(run / "ckpt_0000004")
    assert meta["step"] == 4 and finite_except(model, poison)
