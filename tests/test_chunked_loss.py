"""LLM.loss (llm.ChunkedCrossEntropy) against plain F.cross_entropy over the whole logits: value
and gradients, each reduction, ignored targets and loss_mask, tied embeddings, autocast; the bytes
it keeps for backward; torch.compile(fullgraph=True); and loss_eval's bits per byte from it."""
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import llm
import loss_eval
from conftest import random_tiny_model

CHUNK = 7   # several chunks per test batch, the last one short


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(llm, "LOSS_CHUNK", CHUNK)


def batch(model, B=2, T=20):
    """idx, targets with -1 at row 0's first 3 positions, loss_mask 0 from row 1's position 15."""
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    targets[0, :3] = -1
    loss_mask = torch.ones(B, T, dtype=torch.long)
    loss_mask[1, 15:] = 0
    return idx, targets, loss_mask


def plain_loss(model, idx, targets, loss_mask, reduction):
    """The reference: whole logits, one F.cross_entropy."""
    logits, _ = model(idx)                                               # (B, T, V)
    targets = targets.masked_fill(loss_mask == 0, -1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                           reduction=reduction)


def value_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tied", [False, True])
def test_value_and_gradients_equal_plain_cross_entropy(reduction, tied):
    # float64: chunking is exact maths, so the two agree to rounding (~1e-15); in float32 the sums
    # run in another order and differ by ~1e-7 of their size, which the next test allows for.
    model = random_tiny_model(tie_embeddings=tied).double()
    idx, targets, loss_mask = batch(model)
    loss, grads = value_and_grads(
        model, lambda: model(idx, targets, loss_mask, reduction=reduction)[1])
    ref, ref_grads = value_and_grads(model, lambda: plain_loss(model, idx, targets, loss_mask,
                                                               reduction))
    assert loss.dtype == torch.float64 and abs(loss - ref) <= 1e-6
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-6, name


def test_float32_equals_plain_cross_entropy_to_rounding():
    model = random_tiny_model()
    idx, targets, loss_mask = batch(model)
    loss, grads = value_and_grads(model, lambda: model(idx, targets, loss_mask)[1])
    ref, ref_grads = value_and_grads(model, lambda: plain_loss(model, idx, targets, loss_mask,
                                                               "mean"))
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_autocast_matches_plain_cross_entropy_under_autocast():
    # lm_head's matmuls in bfloat16 as nn.Linear's would be, the softmax in float32: both agree to
    # bfloat16's rounding (the chunked one sums lm_head's gradient in float32, so differs a bit).
    model = random_tiny_model()
    idx, targets, loss_mask = batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = value_and_grads(model, lambda: model(idx, targets, loss_mask)[1])
        ref, ref_grads = value_and_grads(model, lambda: plain_loss(model, idx, targets, loss_mask,
                                                                   "mean"))
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, rtol=1e-3)
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_reduction_none_is_each_positions_loss():
    model = random_tiny_model()
    idx, targets, loss_mask = batch(model)
    with torch.no_grad():
        _, losses = model(idx, targets, loss_mask, reduction="none")
        ref = plain_loss(model, idx, targets, loss_mask, "none").view(targets.shape)
    ignored = (targets == -1) | (loss_mask == 0)
    assert losses.shape == targets.shape and torch.all(losses[ignored] == 0)
    assert torch.allclose(losses, ref, rtol=1e-6, atol=1e-6)


def test_hugging_face_ignore_value_is_ignored_too():
    """-100 (transformers' ignore_index) drops a position as -1 does, in value and gradient; it
    must not be read as a token id."""
    model = random_tiny_model()
    idx, targets, loss_mask = batch(model)
    hf_targets = targets.masked_fill(targets == -1, -100)
    loss, grads = value_and_grads(model, lambda: model(idx, targets, loss_mask)[1])
    hf_loss, hf_grads = value_and_grads(model, lambda: model(idx, hf_targets, loss_mask)[1])
    assert torch.equal(loss, hf_loss) and all(map(torch.equal, grads, hf_grads))


def test_forward_with_targets_returns_no_logits():
    model = random_tiny_model()
    idx, targets, _ = batch(model)
    logits, loss = model(idx, targets)
    assert logits is None and loss.shape == ()
    with pytest.raises(ValueError, match="reduction='avg'"):
        model(idx, targets, reduction="avg")


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while fn runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_loss_tail_saves_no_logits_for_backward(monkeypatch):
    # The tail after hidden: lm_head and the cross-entropy. Chunked, it keeps the gradients for h
    # and lm_head's weight made in forward, (N + V) * d floats; plain keeps float32 logits.
    monkeypatch.setattr(llm, "LOSS_CHUNK", 64)
    model = random_tiny_model(vocab_size=4096)
    B, T, d, V = 4, 128, model.config.d_model, model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    h = torch.randn(B, T, d, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    chunked = saved_bytes(lambda: model.loss(h, targets))
    plain = saved_bytes(lambda: F.cross_entropy(model.lm_head(h).float().flatten(0, 1),
                                                targets.flatten()))
    logits_bytes = B * T * V * 4
    assert plain >= logits_bytes                          # the measure sees the logits
    assert chunked <= (B * T + V) * d * 4 + 64            # the two gradients and scalars
    assert chunked < logits_bytes / 5


def test_loss_compiles_with_fullgraph():
    # fullgraph=True: one graph or an error. aot_eager traces forward and backward as inductor
    # would (2 s); inductor's C++ build of the same graphs takes 25-60 s on two cores.
    model = random_tiny_model(n_kv_head=2)
    idx, targets, loss_mask = batch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    eager, grads = value_and_grads(model, lambda: model.loss(model.hidden(idx), targets, loss_mask))
    loss, compiled_grads = value_and_grads(model, lambda: compiled(model.hidden(idx), targets,
                                                                   loss_mask))
    assert torch.allclose(loss, eager, rtol=1e-6, atol=0)
    for a, b in zip(compiled_grads, grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_evaluate_bpb_equals_plain_per_token_cross_entropy():
    # loss_eval takes each position's loss from LLM.loss (reduction="none"), not whole logits.
    model = random_tiny_model()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(6)
    token_bytes = torch.randint(0, 4, (V,), generator=g)                 # 0: a special token
    batches = []
    for _ in range(2):
        idx, targets, _ = batch(model)
        batches.append((idx, targets, torch.zeros_like(idx), None))
    loss, bpb = loss_eval.evaluate_bpb(model, iter(batches), 2, token_bytes, nullcontext())
    with torch.no_grad():
        ce = torch.cat([plain_loss(model, x, y, torch.ones_like(y), "none") for x, y, _, _ in
                        batches]).double()
    y = torch.cat([y.flatten() for _, y, _, _ in batches])
    nbytes = token_bytes[y.clamp(min=0)] * (y != -1)
    assert loss == pytest.approx(ce[y != -1].mean().item(), rel=1e-6)
    assert bpb == pytest.approx(ce[nbytes > 0].sum().item() / math.log(2) / nbytes.sum().item(),
                                rel=1e-6)
