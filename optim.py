"""The optimizer: which parameters it updates and how.

    optimizer = make_optimizer(cfg, raw_model)

optimizer "adamw": AdamW on every parameter. "muon": Muon (torch.optim.Muon,
https://kellerjordan.github.io/posts/muon/) on the hidden matrices, the 2-D weights inside the
blocks (q/k/v/o, gate/up/down); AdamW on the embeddings, lm_head and the norm gains, which Muon is
not made for. Both are stepped as one object, MuonAdamW.

Learning rates under "muon". The loop sets every param group's lr to plan.get_lr(step), the
schedule of learning_rate; the AdamW groups take it as it is, the Muon groups take it times
muon_lr / learning_rate. So one schedule (warmup, decay) scales both, learning_rate is AdamW's peak
and muon_lr is Muon's. Muon then multiplies its lr per matrix by sqrt(max(1, rows / cols)) (torch's
default, Keller Jordan's rule): an orthogonalised update has singular values near 1, so its
spectral norm is muon_lr times a factor of the matrix's aspect ratio alone, not of its width. That
is the condition under which one learning rate carries across model widths
(https://arxiv.org/abs/2310.17813), and kiln's presets keep the aspect ratios (ffn_hidden ~ 8/3
d_model), so one muon_lr should serve every preset: 0.02, nanochat's and modded-nanogpt's matrix
rate, also the best of 0.02/0.04/0.08 on the demo-sized model (BENCHMARKS.md).
Weight decay is decoupled and uses the schedule's lr, not Muon's: weight_decay shrinks every matrix
by the same factor per step under both optimizers, as it did under AdamW alone.
"""
import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


def make_optimizer(cfg, raw_model):
    """AdamW, or Muon + AdamW (cfg.optimizer); weight decay on matrices (dim >= 2) only, never on
    norm gains. AdamW is fused on every device: the fused kernels take a found_inf flag, so a bad
    step is skipped on the device, without the host reading it (train.gated_step)."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
    if cfg.optimizer not in ("adamw", "muon"):
        raise ValueError(f"config key optimizer={cfg.optimizer!r} must be one of adamw, muon")
    hidden = []
    if cfg.optimizer == "muon":
        if cfg.learning_rate <= 0:
            raise ValueError(f"optimizer=muon needs learning_rate > 0 (Muon's lr is scaled by "
                             f"muon_lr / learning_rate), not {cfg.learning_rate}")
        hidden = [p for p in raw_model.layers.parameters() if p.requires_grad and p.dim() == 2]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in hidden_ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              fused=True)
    if not hidden:
        return adamw
    # The group's lr is on learning_rate's scale, as the loop sets it; lr_scale makes it Muon's.
    muon = Muon(hidden, lr_scale=cfg.muon_lr / cfg.learning_rate, lr=cfg.learning_rate,
                weight_decay=cfg.weight_decay)
    return MuonAdamW(muon, adamw)


class Muon(torch.optim.Muon):
    """torch.optim.Muon (the same update, state and state_dict) with two changes: the update takes
    lr_scale times the group's lr and the decoupled weight decay takes the lr itself (see the module
    docstring), and a matrix that FSDP2 shards (a DTensor) is orthogonalised whole."""

    def __init__(self, params, lr_scale=1.0, **kwargs):
        super().__init__(params, **kwargs)
        self.lr_scale = lr_scale   # not in the param groups: a resumed run takes the config's

    @torch.no_grad()
    def step(self, closure=None, found_inf=None):
        """found_inf (a 0-d float tensor, 1.0 = skip), as the fused optimizers take it: a skipped
        step leaves weights and momentum bitwise as they were, decided on the device. Every term
        is gated by keep = 1 - found_inf, and the gradient zeroed first (inf * 0 is NaN)."""
        if closure is not None:
            raise ValueError("kiln's Muon takes no closure: compute the loss before step()")
        keep = 1.0 if found_inf is None else 1 - found_inf
        skip = None if found_inf is None else found_inf.bool()
        for group in self.param_groups:
            lr = group["lr"]
            decay = 1 - lr * group["weight_decay"]
            if skip is not None:   # exactly torch's arithmetic when found_inf is 0
                decay = torch.where(skip, 1.0, decay)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if skip is None else torch.where(skip, 0.0, p.grad)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                # as torch's: an average, not a sum; weight 0 on a skipped step
                buf.lerp_(grad, (1 - group["momentum"]) * keep)
                update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalise(update, group)
                p.mul_(decay)
                scaled = _adjust_lr(lr * self.lr_scale, group["adjust_lr_fn"], p.shape)
                p.add_(update * keep, alpha=-scaled)


def orthogonalise(update, group):
    """Newton-Schulz (torch's, in bf16) on the whole matrix. Under FSDP2 each rank holds a slice of
    rows, but the iteration needs the whole matrix: all-gather it (in bf16, where the iteration
    starts anyway: half the traffic), orthogonalise it on every rank (the same input, the same
    result) and keep this rank's slice, which needs no communication."""
    args = (group["ns_coefficients"], group["ns_steps"], group["eps"])
    if not isinstance(update, DTensor):
        return _zeropower_via_newtonschulz(update, *args)
    whole = _zeropower_via_newtonschulz(update.bfloat16().full_tensor(), *args)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


class MuonAdamW:
    """Muon and AdamW stepped and zeroed as one optimizer (what the loop and GradScaler call).
    Iterating over it yields the two: torch.distributed.checkpoint's get/set_optimizer_state_dict
    take an iterable of optimizers and keep both states in one dict under the parameters' names, so
    train_state.py saves and resumes this object unchanged (its state goes only that way)."""

    def __init__(self, muon, adamw):
        self.muon = muon
        self.adamw = adamw
        # train.gated_step hands over found_inf: a bad step is skipped on the device, also under
        # FSDP (DTensor math takes the 0-d flag as replicated). The gradients must be unscaled
        # already (GradScaler.unscale_): grad_scale is refused in step().
        self._step_supports_amp_scaling = True

    def __iter__(self):
        return iter((self.muon, self.adamw))

    @property
    def param_groups(self):
        # Read anew each time: load_state_dict replaces the group dicts the loop sets lr in.
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("MuonAdamW takes unscaled gradients: call scaler.unscale_(optimizer) "
                               "before scaler.step(optimizer)")
        found_inf = getattr(self, "found_inf", None)
        self.muon.step(found_inf=found_inf)
        if found_inf is not None:
            self.adamw.found_inf = found_inf
        try:
            self.adamw.step()
        finally:
            self.adamw.__dict__.pop("found_inf", None)

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)
