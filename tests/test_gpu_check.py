"""bench/gpu_check.py runs on CPU with the tiny model before any GPU is lent: every row of the table
present, its numbers finite, the attention kernels close to float32; a failing part and the time
budget each leave the rest of the table standing."""
import math
import os
import re
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # after the sys.path line: bench/ is not a package

# In the order they run: the training step first, cuDNN attention last
CASES = [("train", "plain"), ("train", "act. checkpointing"), ("train", "packed SFT"),
         ("decode", "tiny, batch 1"), ("attention", "FlexAttention, doc mask"),
         ("attention", "float32 math reference"), ("attention", "SDPA flash"),
         ("attention", "SDPA efficient"), ("attention", "SDPA math"), ("attention", "SDPA cudnn")]


def read_table(path):
    """The markdown table -> [(part, case, result, against, note)]."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [tuple(c.strip() for c in line.strip("|").split("|")) for line in lines[2:]]


def numbers(text):
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*\.?\d*(?:e[-+]\d+)?|nan|inf",
                                                          text)]


def run_check(tmp_path, *args):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--model",
                           "tiny", "--out", str(out), "--work", str(tmp_path / "work"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_table(out), proc.stdout


def test_cpu_run_fills_every_row(tmp_path):
    rows, stdout = run_check(tmp_path)
    assert [(part, case.split(" (")[0]) for part, case, *_ in rows] == CASES
    assert "| part | case | result | against | note |" in stdout   # printed as well as written
    by_case = {row[1].split(" (")[0]: row for row in rows}
    for name in ("SDPA flash", "SDPA math", "FlexAttention, doc mask"):
        row = by_case[name]
        assert row[4].startswith("ok"), row
        errors = [float(e) for e in re.findall(r"err (\S+?)[, ]", row[3] + " ")]
        assert errors and all(e < 2e-2 for e in errors), row   # bf16 against float32
        assert all(math.isfinite(x) and x > 0 for x in numbers(row[2])), row
    for name in ("SDPA efficient", "SDPA cudnn"):   # CUDA kernels
        assert by_case[name][4] == "unavailable on cpu"
    for case in ("plain", "act. checkpointing", "packed SFT", "tiny, batch 1"):
        row = by_case[case]
        assert "error" not in row[4] and "skipped" not in row[4], row
        tokens_per_s = numbers(row[2].split(" tokens/s")[0])[-1]
        assert math.isfinite(tokens_per_s) and tokens_per_s > 0, row


def test_no_budget_skips_every_part_but_writes_the_table(tmp_path):
    gpu_check.main(["--device", "cpu", "--model", "tiny", "--out", str(tmp_path / "table.md"),
                    "--work", str(tmp_path / "work"), "--budget", "0"])
    rows = read_table(tmp_path / "table.md")
    assert [row[:2] for row in rows] == CASES
    assert all(row[4].startswith("skipped: time budget") for row in rows)


def test_a_failing_part_is_a_row_not_an_exit():
    rows = []
    budget = gpu_check.Budget(60, gpu_check.torch.device("cpu"))
    gpu_check.guarded(rows, "train", "plain", budget, lambda: 1 / 0)
    gpu_check.guarded(rows, "decode", "tiny", budget, lambda: ("decode", "tiny", "1", "-", "ok"))
    assert rows == [("train", "plain", "-", "-", "error: ZeroDivisionError: division by zero"),
                    ("decode", "tiny", "1", "-", "ok")]
