"""torch.compile in every training mode (parallel.wrap_model): each Block, the final norm and the
loss compiled with fullgraph=True, for one process, DDP and FSDP (gloo, 2 processes), with and
without activation checkpointing, pretraining and packed SFT. Also the attention-kernel setting.

Each compiled run (training and eval) is train.py under this file run as a script (the launcher
at the bottom), which profiles the run and writes, per rank, dynamo's counters (graphs, graph
breaks) and how many times a compiled region ran: dynamo marks each call of compiled code
"Torch-Compiled Region" for the profiler, so a block that ran eagerly would be missing from that
count. The eager reference is the same run with --compile=False on one process (1 and 2
processes train the same run: test_train.py).

Dynamo's capture (graph breaks, fullgraph) and AOTAutograd's trace of forward and backward are
the same for every compiler backend; inductor's C++ code generation costs about a minute per run
on 2 cores, so the one-process runs use inductor (its numbers against eager) and the 2-process
runs aot_eager (the test launcher passes it to torch.compile).
"""
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import conftest
from conftest import run_train
from test_train import ENV, args, finish, log_rows
import generate
import parallel
import sft_data
import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
EVAL_ITERS = 1
N_LAYER = 2   # config/tiny.py's model: 2 blocks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Pretraining shards and an SFT dir ('repeat <words>' -> '<words>' chats), one tokenizer."""
    root = tmp_path_factory.mktemp("compile_data")
    rng = random.Random(0)
    shards = conftest.word_corpus_shards(root, 200, 60, rng=rng)
    with open(root / "chat.jsonl", "w") as f:
        for _ in range(200):
            words = " ".join(rng.choice(conftest.WORDS) for _ in range(rng.randint(1, 6)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"repeat {words}"},
                                             {"role": "assistant", "content": words}]}) + "\n")
    sft_data.prepare_sft([str(root / "chat.jsonl")], root / "tok", root / "chat", max_len=64,
                         val_fraction=0.05)
    return {"pretrain": shards, "sft": root / "chat"}


def run_args(data, stage, out_dir, *extra):
    """STEPS steps; eval (EVAL_ITERS batches) at step 0 and at the end."""
    return args(data[stage], out_dir, f"--stage={stage}", f"--max_iters={STEPS}",
                f"--eval_interval={STEPS}", f"--eval_iters={EVAL_ITERS}", "--sft_samples=0",
                *extra)


@pytest.fixture(scope="module")
def eager(data, tmp_path_factory):
    """{stage: {"loss"|"val_loss": {step: value}}} of the eager run on one process."""
    rows = {}
    for stage in ("pretrain", "sft"):
        out = tmp_path_factory.mktemp(f"eager_{stage}")
        run_train(run_args(data, stage, out, "--compile=False"))
        rows[stage] = {key: log_rows(out, key) for key in ("loss", "val_loss")}
    return rows


def compiled_run(argv, nproc, backend, out_dir):
    """train.py argv with --compile=True under this file's launcher -> [per-rank dynamo stats]."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**ENV, "KILN_TEST_BACKEND": backend, "KILN_TEST_STATS": str(out_dir / "dynamo")}
    proc = subprocess.Popen([sys.executable, *(launcher if nproc > 1 else []), __file__, *argv,
                             "--compile=True"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    finish(proc, timeout=400)
    return [json.loads((out_dir / f"dynamo_{rank}.json").read_text()) for rank in range(nproc)]


MODES = [   # (stage, processes, extra keys, backend): each mode at least once
    ("pretrain", 1, [], "inductor"),
    ("sft", 1, ["--activation_checkpointing=True"], "inductor"),
    ("pretrain", 2, ["--activation_checkpointing=True"], "aot_eager"),                  # DDP
    ("pretrain", 2, ["--fsdp=True"], "aot_eager"),
    ("sft", 2, ["--fsdp=True", "--activation_checkpointing=True"], "aot_eager"),
]
MODE_IDS = ["-".join([s, f"{n}proc", *[e[2:-5] for e in x]]) for s, n, x, _ in MODES]


@pytest.mark.parametrize("stage, nproc, extra, backend", MODES, ids=MODE_IDS)
def test_every_block_runs_compiled_and_trains_as_eager(data, eager, tmp_path, stage, nproc,
                                                       extra, backend):
    if backend == "inductor" and not (shutil.which("c++") or shutil.which("g++")):
        conftest.skip_or_fail_on_ci("torch.compile on CPU needs a C++ compiler (Debian: apt "
                                    "install g++)")
    stats = compiled_run(run_args(data, stage, tmp_path, *extra), nproc, backend, tmp_path)
    grad_accum = 2 // nproc   # config/tiny.py: 512 tokens per step = 2 x 4 x 64 per process
    forwards = grad_accum * (STEPS + 2 * EVAL_ITERS)   # training steps and 2 evals
    for rank in stats:
        assert rank["graph_breaks"] == {}
        # a graph for the blocks (dynamo reuses it for every layer: same code, same shapes), one
        # for the final norm, one for the loss; the same three again for eval (no_grad)
        assert rank["unique_graphs"] == 3 + 3
        # every forward ran each block, the norm and the loss as compiled code
        assert rank["compiled_calls"] == forwards * (N_LAYER + 2)
    for key, steps in (("loss", range(1, STEPS + 1)), ("val_loss", (0, STEPS))):
        rows = log_rows(tmp_path, key)
        assert sorted(rows) == list(steps)
        np.testing.assert_allclose([rows[s] for s in steps], [eager[stage][key][s] for s in steps],
                                   rtol=1e-4)


def test_generation_from_a_compiled_model_runs_its_decode_copy():
    """generate.py decodes on a copy of the model that drops forwards set on the instance: the
    compiled ones here, bound to the original modules, would run without the copy's KV cache."""
    cfg = train.TrainConfig(model="tiny", compile=True, activation_checkpointing=True)
    compiled = conftest.random_tiny_model()
    parallel.wrap_model(cfg, compiled, torch.float32, torch.device("cpu"), 1)
    prompt = torch.tensor([[1, 2, 3, 4]])
    tokens = [list(generate.generate(model, prompt, 8, temperature=0))
              for model in (compiled, conftest.random_tiny_model())]
    assert torch.equal(torch.cat(tokens[0]), torch.cat(tokens[1]))


# ---- Attention kernels (attention_backends): the parsing here; the choice reaches torch
def test_attention_backends_are_parsed_in_order():
    assert parallel.attention_backends(" efficient, cudnn ,math,efficient") == [
        SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    default = train.TrainConfig().attention_backends
    assert SDPBackend.CUDNN_ATTENTION not in parallel.attention_backends(default)


@pytest.mark.parametrize("text, words", [("flash,flashattention", "unknown kernel flashattention"),
                                         (" , ", "no kernel")])
def test_bad_attention_backends_is_one_clear_line(text, words):
    with pytest.raises(ValueError) as e:
        parallel.attention_backends(text)
    message = str(e.value)
    assert words in message and "flash, efficient, cudnn, math" in message and "\n" not in message


def test_the_chosen_kernels_reach_torch():
    """The enabled kernels and their priority, as torch's SDPA dispatcher reads them; on CPU it
    picks between flash and math by the same flags."""
    q = torch.randn(1, 2, 8, 16)
    everything = list(parallel.SDPA_BACKENDS.values())
    with sdpa_kernel(everything, set_priority=True):   # restores this process's setting after
        parallel.set_attention_backends(parallel.attention_backends("math,cudnn"))
        assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch._C._get_sdp_priority_order()[:2] == [int(SDPBackend.MATH),
                                                         int(SDPBackend.CUDNN_ATTENTION)]
        assert torch._fused_sdp_choice(q, q, q, is_causal=True) == int(SDPBackend.MATH)
        parallel.set_attention_backends(parallel.attention_backends("flash,math"))
        assert torch._fused_sdp_choice(q, q, q, is_causal=True) == int(SDPBackend.FLASH_ATTENTION)


def test_cpu_runs_leave_the_kernels_alone():
    cfg = train.TrainConfig(model="tiny", compile=False, attention_backends="math")
    flash = torch.backends.cuda.flash_sdp_enabled()
    parallel.wrap_model(cfg, conftest.tiny_model(), torch.float32, torch.device("cpu"), 1)
    assert torch.backends.cuda.flash_sdp_enabled() == flash
    bad = train.TrainConfig(model="tiny", compile=False, attention_backends="fast")
    with pytest.raises(ValueError, match="unknown kernel"):   # but a typo fails on any device
        parallel.wrap_model(bad, conftest.tiny_model(), torch.float32, torch.device("cpu"), 1)


def launch(argv):
    """train.main(argv), profiled; then this rank's dynamo stats to $KILN_TEST_STATS_<rank>.json."""
    from functools import partial
    from torch._dynamo.utils import counters
    # the test's choice of compiler backend, for every torch.compile that wrap_model makes
    torch.compile = partial(torch.compile, backend=os.environ["KILN_TEST_BACKEND"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train.main(argv)
    regions = Counter(e.name for e in prof.events() if e.name.startswith("Torch-Compiled Region"))
    stats = {"unique_graphs": counters["stats"]["unique_graphs"],
             "graph_breaks": dict(counters["graph_break"]), "compiled_calls": sum(regions.values())}
    path = Path(f"{os.environ['KILN_TEST_STATS']}_{os.environ.get('RANK', '0')}.json")
    path.write_text(json.dumps(stats))


if __name__ == "__main__":
    launch(sys.argv[1:])
