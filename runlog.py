"""A run's record: log.jsonl rows (and wandb when asked), and the loss curves drawn from them.

    log = RunLog("out/demo", master=rank == 0, run_config=config_dict)   # writes config.json
    log({"step": 10, "loss": 3.2}, "step 10 | loss 3.2")    # a row, a printed line, or both
    plot_losses("out/demo/log.jsonl", "out/demo/loss.png", tokens_per_step=2048)

The curves are drawn with matplotlib (Agg, no display needed): the train loss smoothed over its
faint raw curve, the val loss as points, steps below and tokens seen above.
"""
import io
import json
import math
import time
from pathlib import Path

import common


class RunLog:
    """Prints a message and appends a row to out_dir/log.jsonl and to wandb (when wandb_project is
    given and wandb is installed); a no-op off rank 0, so the loop has no branches for either.
    On rank 0 it starts the run folder with run_config (a JSON-able dict) as config.json."""

    def __init__(self, out_dir, master, run_config=None, wandb_project=None):
        self.master = master
        self.path = Path(out_dir) / "log.jsonl"
        self.t0 = time.time()   # a row's "time": seconds since the run started
        self.wandb = None
        if master and run_config is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            common.write_json(Path(out_dir) / "config.json", run_config)
        if master and wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, name=Path(out_dir).name,
                                        config=run_config)
            except ImportError:
                print("wandb_log=True but wandb is not installed (pip install wandb): "
                      "logging to log.jsonl only")

    def __call__(self, row=None, msg=None):
        if self.master and msg is not None:
            print(msg)
        if self.master and row is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.wandb:
                self.wandb.log(row, step=row["step"])

    def step(self, row, max_iters, eta):
        """A training step's row, printed as one line (nanoGPT's)."""
        mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
        self(row, f"step {row['step']}/{max_iters} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                  f"norm {row['grad_norm']:.3f} | {row['dt_ms']:.0f} ms | "
                  f"{row['tokens_per_s']:,.0f} tok/s | MFU {mfu} | mem {row['mem_gb']:.2f} GB | "
                  f"eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m")

    def eval(self, row):
        """An eval's row: its numbers on one line, then the SFT samples it holds."""
        numbers = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
        samples = "".join(f"\n  prompt: {s['prompt'][-200:]!r}\n  answer: {s['answer']!r}"
                          for s in row.get("samples", []))
        self(row, f"eval step {row['step']}: {numbers}{samples}")


def read_rows(log_path):
    """The rows of a log.jsonl, in the order they were written."""
    with open(log_path) as f:
        return [json.loads(line) for line in f]


def read_curve(rows, key):
    """[(step, value)] of the rows holding key, finite values only. A resumed run logs the steps
    after its checkpoint again: the last value of a step wins."""
    by_step = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
    return [(s, v) for s, v in sorted(by_step.items()) if math.isfinite(v)]


def smooth(values, beta=None):
    """Exponential moving average with bias correction (the first points are not pulled to 0).
    beta None: a span of 1/25 of the curve (a 20-step run stays raw, 300 steps average over ~12)."""
    if beta is None:
        beta = 1 - 2 / (max(1, len(values) // 25) + 1)
    out = []
    avg = 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def plot_losses(log_path, png_path, tokens_per_step=None, log_scale=False):
    """Train and val loss against step as an 800 x 500 PNG.
    tokens_per_step adds tokens seen as a second x axis; log_scale puts the loss on a log axis.
    Returns False, drawing nothing, when the log holds no loss yet."""
    from matplotlib.figure import Figure   # here: the import costs ~0.5 s, paid at the end only
    from matplotlib.ticker import EngFormatter, FormatStrFormatter, MaxNLocator
    rows = read_rows(log_path)
    train = read_curve(rows, "loss")
    val = read_curve(rows, "val_loss")
    if not train and not val:
        return False
    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(losses), color="tab:blue", linewidth=1.8, label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o", color="tab:orange", markersize=6, label="val")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (nats per token)")
    if log_scale:   # plain numbers (2, 3, 4) on the ticks, not powers of ten
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    if tokens_per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step,
                                                   lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
        top.xaxis.set_major_formatter(EngFormatter())   # 200 k, 1.5 M, 3 G
    ax.grid(True, alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    common.write_atomic(png_path, buf.getvalue())
    return True
