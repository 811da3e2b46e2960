"""runlog.py: log rows only on rank 0, and the loss plot from logs of every shape a run leaves."""
import json

import pytest
from PIL import Image

import runlog


def write_log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_rows(steps, start=4.0):
    return [{"step": s, "loss": start - 0.01 * s} for s in steps]


def val_rows(steps):
    return [{"step": s, "val_loss": 4.0 - 0.008 * s} for s in steps]


def drawn(tmp_path, rows, **kw):
    """Plot rows -> the PNG's (width, height); a real PNG, read back by Pillow."""
    log = write_log(tmp_path / "log.jsonl", rows)
    assert runlog.plot_losses(log, tmp_path / "loss.png", **kw)
    with Image.open(tmp_path / "loss.png") as img:
        assert img.format == "PNG"
        return img.size


def test_plot_is_an_800_by_500_png(tmp_path):
    rows = train_rows(range(1, 101)) + val_rows(range(0, 101, 25))
    assert drawn(tmp_path, rows, tokens_per_step=2048) == (800, 500)


def test_plot_of_val_rows_only(tmp_path):
    assert drawn(tmp_path, val_rows([0, 50, 100])) == (800, 500)


def test_plot_of_train_rows_only(tmp_path):
    assert drawn(tmp_path, train_rows(range(1, 20))) == (800, 500)


def test_plot_of_a_resumed_run(tmp_path):
    """A resumed run logs the steps after its checkpoint again, and a skipped step's row."""
    rows = (train_rows(range(1, 8)) + [{"step": 8, "skipped": "non-finite loss nan"}]
            + train_rows(range(6, 12), start=3.9) + [{"step": 9, "loss": float("nan")}])
    assert drawn(tmp_path, rows, log_scale=True) == (800, 500)


def test_resumed_steps_keep_the_last_value():
    rows = train_rows([1, 2, 3]) + [{"step": 2, "loss": 1.0}, {"step": 3, "loss": float("inf")}]
    assert runlog.read_curve(rows, "loss") == [(1, pytest.approx(3.99)), (2, 1.0)]


def test_nothing_to_plot_draws_nothing(tmp_path):
    log = write_log(tmp_path / "log.jsonl", [{"step": 0, "too_long": 3}])
    assert not runlog.plot_losses(log, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_smoothing_starts_at_the_first_value():
    assert runlog.smooth([4.0, 4.0, 4.0], beta=0.9) == pytest.approx([4.0, 4.0, 4.0])


def test_short_curves_stay_raw():
    assert runlog.smooth([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]


def test_log_is_silent_off_rank_0(tmp_path, capsys):
    runlog.RunLog(tmp_path / "run", master=False, run_config={"seed": 1})({"step": 1}, "step 1")
    assert not (tmp_path / "run").exists() and capsys.readouterr().out == ""


def test_log_writes_the_run_config(tmp_path):
    runlog.RunLog(tmp_path / "run", master=True, run_config={"seed": 1, "stage": "sft"})
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"seed": 1, "stage": "sft"}


def test_log_appends_rows_on_rank_0(tmp_path, capsys):
    log = runlog.RunLog(tmp_path, master=True)
    log({"step": 1, "loss": 2.0}, "step 1")
    log({"step": 2, "loss": 1.5})
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert capsys.readouterr().out == "step 1\n"
