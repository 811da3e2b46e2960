"""Held-out numbers during training: val loss and bits per byte, and greedy answers to SFT prompts.

    loss, bpb = evaluate_bpb(model, val_loader, steps, token_bytes, autocast)
    numbers = evaluate_sources(model, {"/a": val_a, "/b": val_b}, steps, token_bytes, autocast)
    samples = sft_samples(model, prompts, max_new_tokens, tokenizer, autocast)

Both take the unwrapped model (never DDP, never compiled). The val numbers are sums over all
processes, so 1 or N processes report the same ones.
"""
import math

import torch
import torch.distributed as dist

import generate


def all_sum(t):
    """Sum a tensor over all processes (in place); a no-op for one process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, autocast):
    """-> (mean cross-entropy per learned token, bits per byte) over `steps` batches of the iterator
    `batches` (a loader: x, y, doc_ids, state; CPU tensors), summed over all processes.

    token_bytes: (vocab,) tensor on the model's device, the UTF-8 length of each token. Bits per
    byte leave out special tokens (0 bytes, e.g. <|bos|>) as nanochat does: they encode no text."""
    device = token_bytes.device
    sums = torch.zeros(4, device=device)  # CE nats, tokens, CE nats of tokens with bytes, bytes
    for _ in range(steps):
        x, y, doc_ids, _ = next(batches)
        x = x.to(device)                                                      # (B, T)
        y = y.to(device)                                                      # (B, T)
        doc_ids = None if doc_ids is None else doc_ids.to(device)             # (B, T)
        with autocast:   # per-token float32 CE, 0 at y == -1, chunked: no whole-batch logits
            _, ce = model(x, y, doc_ids=doc_ids, reduction="none")            # (B, T)
        ce = ce.flatten()                                                     # (B*T,)
        y = y.flatten()                                                       # (B*T,)
        nbytes = token_bytes[y.clamp(min=0)] * (y != -1)                      # (B*T,)
        sums += torch.stack([ce.sum(), (y != -1).sum(), ce[nbytes > 0].sum(), nbytes.sum()])
    ce_sum, n, ce_text, nbytes = all_sum(sums).tolist()
    return ce_sum / max(n, 1), ce_text / math.log(2) / max(nbytes, 1)


def evaluate_sources(model, sources, steps, token_bytes, autocast):
    """{suffix: val loader} -> val_loss and val_bpb + suffix of each source (suffix "" for a single
    one, "/name" in a mixture), and for a mixture their plain means under the bare names."""
    results = {}
    for suffix, batches in sources.items():
        loss, bpb = evaluate_bpb(model, batches, steps, token_bytes, autocast)
        results["val_loss" + suffix] = loss
        results["val_bpb" + suffix] = bpb
    if len(sources) > 1:
        for key in ("val_loss", "val_bpb"):
            results[key] = sum(results[key + suffix] for suffix in sources) / len(sources)
    return results


@torch.no_grad()
def sft_samples(model, prompts, max_new_tokens, tokenizer, autocast):
    """Greedy answers, up to the end of a reply (tokenizer.stop_ids: kiln's <|end|>, the chat
    template's end-of-turn marker), to prompts (1-D token arrays, each ending with <|assistant|>)
    -> [{"prompt": text, "answer": text}]. A prompt with no room left in max_seq_len is skipped."""
    device = next(model.parameters()).device
    if hasattr(model, "unshard"):  # FSDP2: generate bypasses forward(), so gather the weights here
        model.unshard()
    samples = []
    for ids in prompts:
        n_new = min(max_new_tokens, model.config.max_seq_len - len(ids))
        if n_new <= 0:
            continue
        prompt = torch.tensor(ids, dtype=torch.long, device=device)[None]   # (1, len(ids))
        # generate is a Python generator: consume it inside the block, or nothing is autocast
        with autocast:
            tokens = generate.generate(model, prompt, n_new, temperature=0,
                                       stop_ids=tokenizer.stop_ids)
            answer = [int(t) for t in tokens]
        samples.append({"prompt": tokenizer.decode(ids), "answer": tokenizer.decode(answer)})
    if hasattr(model, "reshard"):
        model.reshard()
    return samples
