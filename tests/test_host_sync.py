"""train.py's loop makes no host sync on a step that is not read (train.read_due).

On a GPU a host sync is the Python process waiting for the device: `.item()`, `.tolist()`,
`bool()`, `float()`, `int()` or `__index__` of a device tensor, `.cpu()` or `.numpy()` of one.
On CPU nothing waits, so a sync is not real here: the test counts the calls instead. It wraps those
torch.Tensor methods, runs train.py's own loop in this process (config/tiny.py, 10 steps) and
charges each call to the step in flight (setup and the eval before step 1 are step 0). Calls made
from C++ inside torch are not seen; Python-level ones are, torch's own included (clip_grad_norm_,
the optimizer, GradScaler).

The rule, with log_interval=4, max_bad_steps=5, eval_interval=10 and no periodic checkpoint: the
host reads after steps 4 and 8 (log lines), 5 (the bad-step count) and 10 (the end: the log, the
eval and the checkpoint). Steps 1, 2, 3, 6, 7 and 9 make no call; a read makes exactly one.
"""
from collections import Counter

import pytest
import torch

from conftest import run_train, word_corpus_shards
import train

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return word_corpus_shards(tmp_path_factory.mktemp("sync_data"), 100, 80)


def count_syncs(monkeypatch):
    """Wrap the sync methods and train.train_step -> Counter {(step in flight, method): calls}."""
    calls = Counter()
    step = [0]
    real_step = train.train_step

    def counted_step(*args, **kwargs):
        step[0] += 1
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", counted_step)
    for name in SYNCS:
        def wrapper(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            calls[step[0], _name] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_syncs_only_on_read_steps(optimizer, data_dir, tmp_path, monkeypatch):
    calls = count_syncs(monkeypatch)
    run_train(["config/tiny.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
               f"--optimizer={optimizer}",
               "--max_iters=10", "--log_interval=4", "--max_bad_steps=5", "--eval_interval=10",
               "--ckpt_interval=0"])
    monkeypatch.undo()
    per_step = Counter()
    for (step, _), n in calls.items():
        per_step[step] += n
    reads = [s for s in range(1, 11) if train.read_due(train.TrainConfig(
        max_iters=10, log_interval=4, max_bad_steps=5, eval_interval=10, ckpt_interval=0), s, 0)]
    assert reads == [4, 5, 8, 10]
    silent = {(s, name): n for (s, name), n in calls.items() if s not in reads and s != 0}
    assert not silent, f"host syncs on steps that are not read: {silent}"
    assert [per_step[s] for s in (4, 5, 8)] == [1, 1, 1], dict(calls)
    assert per_step[10] > 1   # the eval and the checkpoint: the counting sees them
