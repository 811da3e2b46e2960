"""What differs between pretraining and SFT, in one place per stage, so train.py's loop never asks.

    stage = tasks.STAGES[cfg.stage](cfg)         # Pretrain(cfg) or SFT(cfg)
    stage.check_data()                           # fail early, naming the data.py command
    loader = stage.loader(cfg.data_dir, "train", rank, world_size, vocab_size)
    loss = train_step(model, batches, stage.n_tokens(batches), ...)

Both classes have the same methods and attributes; nothing else chooses between them. check_data
also sets stage.val, {suffix: dir} of the sources with a val split: empty after data.py
--val_fraction 0, and then the run trains without eval.
"""
import json
from pathlib import Path

import numpy as np

import data
import loader as loaders
import loss_eval
import readers


def data_dirs(data_dir):
    """'data/a:0.7,data/b:0.3' -> ['data/a', 'data/b']; a plain dir -> [it]."""
    return [d for d, _ in readers.parse_weighted(data_dir)]


def check_prepared(data_dir, want, stage, presets, sft_flag=""):
    """Fail before anything starts when a dir of data_dir has no `want` files, naming the data.py
    command that makes them."""
    for d in data_dirs(data_dir):
        if not list(Path(d).glob(want)):
            name = Path(d).name
            src = f"--source {name}" if name in presets else "--input FILES"
            which = " (the tokenizer the model was pretrained with)" if sft_flag else ""
            raise FileNotFoundError(f"data dir {d} has no {want} ({stage} data); create it with "
                                    f"`python data.py {sft_flag}{src} --tokenizer data/tok "
                                    f"--out {d}`{which}")


def val_sources(data_dir, has_val):
    """{suffix: dir} of the dirs of data_dir whose val split has_val(dir): suffix "" for one dir,
    "/NAME" for each source of a mixture (the suffix of its val_loss)."""
    dirs = data_dirs(data_dir)
    return {("" if len(dirs) == 1 else "/" + Path(d).name): d for d in dirs if has_val(Path(d))}


def announce_val(stage, log):
    """One line when a dir has no val split (data.py --val_fraction 0): the run goes on without
    its eval rather than refusing."""
    missing = [d for d in data_dirs(stage.cfg.data_dir) if d not in stage.val.values()]
    if missing:
        then = "evaluating the other sources only" if stage.val else "training without eval"
        log(msg=f"no val split in {', '.join(missing)} (prepared with --val_fraction 0): {then}")


class Pretrain:
    """Pretraining on token shards (one dir or a weighted mixture). The loss is the plain mean over
    every target of the step: all count, so the denominator is total_batch_tokens (no count, no
    all-reduce). Eval reports bits per byte beside the loss."""
    name = "pretrain"
    metrics = ("val_loss", "val_bpb")
    shape_from_config = True   # resuming checks the checkpoint's shape against the config's

    def __init__(self, cfg):
        self.cfg = cfg

    def check_data(self):
        pretrain_presets = [p for p in data.PRESETS if p not in data.SFT_PRESETS]
        check_prepared(self.cfg.data_dir, "train_*.bin", self.name, pretrain_presets)
        self.val = val_sources(self.cfg.data_dir, lambda d: any(d.glob("val_*.bin")))

    def loader(self, data_dir, split, rank, world_size, vocab_size, sequential=False):
        cfg = self.cfg
        return loaders.PretrainLoader(data_dir, split, cfg.batch_size, cfg.block_size, rank,
                                      world_size, cfg.seed, sequential=sequential,
                                      vocab_size=vocab_size)

    def n_tokens(self, batches):
        return float(self.cfg.total_batch_tokens)

    def eval_extras(self, model, tokenizer, autocast):
        return {}

    def announce(self, log, loader, step):
        announce_val(self, log)


def has_sft_val(d):
    """Whether SFT dir d holds val conversations (--val_fraction 0 writes val files of none)."""
    offsets = d / "val_offsets.npy"
    return offsets.exists() and len(np.load(offsets, mmap_mode="r")) > 1


class SFT:
    """Supervised fine-tuning on prepared conversations (one dir). The loss is the summed
    cross-entropy of the learned (assistant) tokens on all micro-batches and processes over their
    count, so batches of short answers do not weigh more than long ones (as a mean of means would).
    Eval adds greedy answers to held-out prompts."""
    name = "sft"
    metrics = ("val_loss",)
    shape_from_config = False   # the shape comes from the checkpoint SFT starts from

    def __init__(self, cfg):
        self.cfg = cfg

    def check_data(self):
        if "," in self.cfg.data_dir:
            raise ValueError(f"SFT data_dir={self.cfg.data_dir!r} must be one folder: mix SFT "
                             "sources when preparing it (python data.py --sft --input a.jsonl:0.7 "
                             "b.jsonl:0.3 --out DIR)")
        check_prepared(self.cfg.data_dir, "train_offsets.npy", self.name, data.SFT_PRESETS,
                       "--sft ")
        self.val = val_sources(self.cfg.data_dir, has_sft_val)

    def loader(self, data_dir, split, rank, world_size, vocab_size, sequential=False):
        """Conversations packed into rows (vocab_size, sequential: the pretraining loader's)."""
        cfg = self.cfg
        return loaders.SFTLoader(data_dir, split, cfg.batch_size, cfg.block_size, rank, world_size,
                                 cfg.seed)

    def n_tokens(self, batches):
        """The learned targets (y != -1) of this step's micro-batches on all processes."""
        n = sum((y != -1).sum() for _, y, _ in batches).float()
        return loss_eval.all_sum(n).clamp(min=1)

    def val_prompts(self):
        """The first sft_samples val conversations up to their first answer (so ending with
        <|assistant|>), as token arrays."""
        d = Path(self.cfg.data_dir)
        ids = np.load(d / "val_ids.npy", mmap_mode="r")
        mask = np.load(d / "val_mask.npy", mmap_mode="r")
        offsets = np.load(d / "val_offsets.npy", mmap_mode="r")
        prompts = []
        for c in range(min(self.cfg.sft_samples, len(offsets) - 1)):
            a, b = offsets[c], offsets[c + 1]
            start = int(np.argmax(mask[a:b]))   # the first learned token
            if start > 0:
                prompts.append(ids[a:a + start].astype(np.int64))
        return prompts

    def eval_extras(self, model, tokenizer, autocast):
        if not self.cfg.sft_samples:
            return {}
        samples = loss_eval.sft_samples(model, self.val_prompts(), self.cfg.sft_max_new_tokens,
                                        tokenizer, autocast)
        return {"samples": samples}

    def announce(self, log, loader, step):
        """The data's numbers at the start of the run: conversations, skipped, decontaminated."""
        meta = json.loads((Path(self.cfg.data_dir) / "meta.json").read_text())
        decon = meta.get("decontamination", {})
        removed = decon.get("removed", 0)
        mmlu = decon.get("mmlu_dir") or "no MMLU folder: not checked"
        log({"step": step, "decontaminated": removed, "too_long": loader.too_long},
            f"SFT data: {meta.get('train_conversations')} train / "
            f"{meta.get('val_conversations')} val conversations; {loader.too_long} train "
            f"conversations longer than block_size + 1 skipped; {removed} removed for 13-gram "
            f"overlap with MMLU test ({mmlu}); record counts {meta.get('counts')}")
        announce_val(self, log)


STAGES = {"pretrain": Pretrain, "sft": SFT}
