"""FlexAttention for packed documents (llm.doc_mask, Attention's BlockMask path) against the dense
(B, 1, T, T) mask that SDPA takes: the same logits and gradients, no attention across documents,
blocks across documents skipped, and a compiled Block that takes a BlockMask whole.

Packed rows run flex only on CUDA (llm.FLEX_DEVICES): torch 2.13's flex_attention refuses backward
on CPU in its Python entry point (_validate_device) although its unfused math implementation, the
one eager flex runs, has one. The fixture below lifts that check and puts CPU among FLEX_DEVICES,
so these tests run the model's flex path, backward included, on CPU in float32. CUDA runs torch's
fused kernel instead, which these tests cannot reach."""
import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

import llm
from conftest import random_tiny_model

T = 256   # the tiny preset's max_seq_len: two of flex's 128-position blocks per row
# eager flex_attention warns once that it is unfused: that is the CPU reference wanted here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def use_flex(monkeypatch):
    """Packed rows take the flex path on CPU from now on; -> the list of calls: "mask" for each
    BlockMask built, (H, KV) head counts for each flex_attention call."""
    calls = []

    def counted(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1]))
        return flex_module.flex_attention(q, k, v, **kwargs)

    def counted_mask(*args, **kwargs):
        calls.append("mask")
        return flex_module.create_block_mask(*args, **kwargs)
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(llm, "flex_attention", counted)
    monkeypatch.setattr(llm, "create_block_mask", counted_mask)
    monkeypatch.setattr(llm, "FLEX_DEVICES", ("cpu",))
    return calls


@pytest.fixture
def flex_calls(monkeypatch):
    return use_flex(monkeypatch)


def packed_batch(vocab_size):
    """Two rows of T tokens and their doc_ids: documents of 100, 90 and 66 tokens (ids repeat, a
    document is a contiguous run; one crosses the 128 block boundary), and 30, 200, 26."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, vocab_size, (2, T), generator=g)
    doc_ids = torch.tensor([[3] * 100 + [5] * 90 + [3] * 66, [1] * 30 + [2] * 200 + [3] * 26])
    targets = torch.randint(0, vocab_size, (2, T), generator=g)
    return idx, doc_ids, targets


def logits_and_grads(model, idx, doc_ids, targets):
    model.zero_grad()
    logits, _ = model(idx, doc_ids=doc_ids)
    _, loss = model(idx, targets, doc_ids=doc_ids)
    loss.backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def close(a, b, rel=1e-5):
    """Within rel of the reference's largest magnitude (float32 sums in another order)."""
    return (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])   # MHA, GQA, MQA
def test_flex_logits_and_gradients_equal_the_dense_mask(monkeypatch, n_kv_head):
    model = random_tiny_model(n_kv_head=n_kv_head)
    idx, doc_ids, targets = packed_batch(model.config.vocab_size)
    dense_logits, dense_grads = logits_and_grads(model, idx, doc_ids, targets)
    calls = use_flex(monkeypatch)
    flex_logits, flex_grads = logits_and_grads(model, idx, doc_ids, targets)
    # per forward one BlockMask, then flex in every layer with K/V at their own head count
    assert calls == (["mask"] + [(4, n_kv_head)] * model.config.n_layer) * 2
    assert dense_logits.abs().max() > 1.0
    assert close(flex_logits, dense_logits)
    for (name, _), a, b in zip(model.named_parameters(), flex_grads, dense_grads):
        assert b.abs().max() > 0 and close(a, b), name


def test_no_token_attends_across_documents(flex_calls):
    model = random_tiny_model(n_kv_head=2)
    idx, doc_ids, _ = packed_batch(model.config.vocab_size)
    changed = idx.clone()
    changed[0, 100:190] = (changed[0, 100:190] + 1) % model.config.vocab_size   # row 0's 2nd doc
    with torch.no_grad():
        logits, _ = model(idx, doc_ids=doc_ids)
        logits2, _ = model(changed, doc_ids=doc_ids)
        alone = model(idx[:1, 100:190])[0]
    others = torch.ones(T, dtype=torch.bool)
    others[100:190] = False
    assert torch.allclose(logits2[0, others], logits[0, others], atol=1e-6, rtol=0)
    assert torch.equal(logits2[1], logits[1])
    assert (logits2[0, 100:190] - logits[0, 100:190]).abs().max() > 1e-2
    assert close(logits[:1, 100:190], alone)   # the document sees what it sees run alone


def test_block_mask_skips_blocks_across_documents():
    # Which (query block, key block) pairs flex computes: those where the dense mask has any True.
    segment = torch.tensor([[1] * 128 + [2] * 200 + [3] * 184, [1] * 512])
    block_mask = llm.doc_mask(segment, flex=True)
    dense = llm.doc_mask(segment, flex=False)                            # (B, 1, T, T)
    needed = dense.view(2, 1, 4, 128, 4, 128).any(dim=(3, 5))             # (B, 1, 4, 4) blocks
    assert torch.equal(block_mask.to_dense().bool(), needed)
    assert needed[0].sum() == 6 and needed[1].sum() == 10   # 4 of the 10 causal blocks skipped


def test_compiled_block_takes_the_block_mask_whole(flex_calls, monkeypatch):
    # fullgraph=True: one graph or an error. aot_eager traces forward and backward as training's
    # compile does; inductor's CPU kernel for flex is inference-only in torch 2.13.
    model = random_tiny_model(n_kv_head=2)
    idx, doc_ids, _ = packed_batch(model.config.vocab_size)
    pos, segment = llm.doc_positions(doc_ids)
    block_mask = llm.doc_mask(segment, flex=True)
    cos, sin = model.rope(pos)
    x = model.embed_tokens(idx).detach().requires_grad_()
    block = model.layers[0]
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    outs, grads = [], []
    for run in (block, compiled):
        y = run(x, cos, sin, block_mask)
        outs.append(y.detach())
        grads.append(torch.autograd.grad(y.sin().sum(), x)[0])
    assert close(outs[1], outs[0]) and close(grads[1], grads[0])
    # The next batch's documents fall elsewhere: a new BlockMask, the same graph (a recompile per
    # batch would soon hit dynamo's limit and fall back to eager). Without the counting wrapper,
    # whose growing list dynamo guards on.
    monkeypatch.setattr(llm, "flex_attention", flex_module.flex_attention)
    compiled(x, cos, sin, block_mask)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    pos, segment = llm.doc_positions(torch.roll(doc_ids, shifts=7, dims=1))
    cos, sin = model.rope(pos)
    new_mask = llm.doc_mask(segment, flex=True)
    assert close(compiled(x, cos, sin, new_mask).detach(), block(x, cos, sin, new_mask).detach())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
