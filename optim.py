"""The optimizer: which parameters it updates and how.

    optimizer = make_optimizer(cfg, raw_model, device)
"""
import torch


def make_optimizer(cfg, raw_model, device):
    """AdamW; weight decay on matrices (dim >= 2) only, never on norm gains. Fused on CUDA."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")
