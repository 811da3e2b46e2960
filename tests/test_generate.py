"""generate.py against independent references: argmax over full forwards, no-cache generation, the
eager decode step for the compiled one."""
import copy
import shutil

import pytest
import torch
import torch.distributed as dist

import generate
from conftest import random_tiny_model, skip_or_fail_on_ci


tiny_model = random_tiny_model


def tokens(model, idx, n, **kw):
    """generate's tokens as one (B, n) tensor."""
    return torch.stack(list(generate.generate(model, idx, n, **kw)), dim=1)


def greedy_by_full_forward(model, idx, n):
    """The reference: argmax over the full forward, one token at a time, (B, n)."""
    seq = idx
    for _ in range(n):
        with torch.no_grad():
            next_tok = model(seq)[0][:, -1].argmax(-1, keepdim=True)                 # (B, 1)
        seq = torch.cat([seq, next_tok], dim=1)
    return seq[:, idx.shape[1]:]


def prompt(model, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


# -------------------------------------------------------------------------------------------------
# KV cache and the decode copy


def test_kv_cache_greedy_equals_full_forward_greedy():
    model = tiny_model(n_kv_head=2)
    idx = prompt(model, 2, 9, seed=2)
    cached = tokens(model, idx, 50, temperature=0)
    assert cached.shape == (2, 50)
    assert torch.equal(cached, greedy_by_full_forward(model, idx, 50))


def test_kv_cache_greedy_equals_no_cache_greedy():
    model = tiny_model(n_kv_head=2)
    idx = prompt(model, 2, 9, seed=2)
    cached = tokens(model, idx, 50, temperature=0)
    assert torch.equal(cached, tokens(model, idx, 50, temperature=0, use_cache=False))


def test_generation_sees_weights_changed_between_calls():
    # Each generate call stacks and transposes the weights once (generate.InOutMatmul): an optimizer
    # step between two calls (as in training-time sampling) must reach the next call.
    model = tiny_model(n_kv_head=2)
    idx = prompt(model, 2, 9, seed=2)
    before = tokens(model, idx, 20, temperature=0)
    with torch.no_grad():                                 # in-place copy_, like an optimizer step
        for p, q in zip(model.parameters(), random_tiny_model(3, n_kv_head=2).parameters()):
            p.copy_(q)
    after = tokens(model, idx, 20, temperature=0)
    assert torch.equal(after, greedy_by_full_forward(model, idx, 20))
    assert not torch.equal(after, before)


def test_activation_checkpointed_blocks_generate_like_plain_ones():
    # train.py's activation checkpointing sets block.forward on each block: the decode copy must not
    # call that bound method of the original block (it would skip the KV cache).
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    model = tiny_model(n_kv_head=2)
    idx = prompt(model, 2, 9, seed=2)
    want = greedy_by_full_forward(model, idx, 20)
    for block in model.layers:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    assert torch.equal(tokens(model, idx, 20, temperature=0), want)


def test_chunked_prefill_equals_one_forward():
    model = tiny_model(n_kv_head=2)
    x = prompt(model, 2, 12, seed=7)
    cached = generate.with_kv_cache(model, 2, 12)
    with torch.no_grad():
        chunks = [cached.hidden(x[:, a:b], start=a) for a, b in ((0, 5), (5, 6), (6, 12))]
        full = model.hidden(x)
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_an_abandoned_generation_leaves_the_model_as_it_was():
    """The KV caches live on a per-call decode copy: a generator left half-way (a chat reply cut
    short) must leave no cache behind that the next forward would read."""
    model = tiny_model(n_kv_head=2)
    idx = prompt(model, 2, 9, seed=4)
    with torch.no_grad():
        before = model(idx)[0]
    steps = generate.generate(model, idx, 20, temperature=0)
    next(steps)
    next(steps)
    assert all(block.self_attn.kv_cache is None for block in model.layers)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before)


def test_fsdp_sharded_model_generates_like_the_plain_one():
    """Under FSDP2 (train.py --fsdp) each block's weights exist whole only inside its forward hook:
    generation must read them there, as the plain model's. One process (gloo), so the hooks run
    without a second rank."""
    from torch.distributed.fsdp import fully_shard
    plain = tiny_model(n_kv_head=2)
    sharded = tiny_model(n_kv_head=2)
    idx = prompt(plain, 2, 9, seed=1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for block in sharded.layers:
            fully_shard(block)
        fully_shard(sharded)
        sharded.unshard()              # the root's weights, as train.py gathers them for sampling
        out = tokens(sharded, idx, 20, temperature=0)
        sharded.reshard()
    finally:
        dist.destroy_process_group()
    assert torch.equal(out, tokens(plain, idx, 20, temperature=0))


def test_kv_cache_refuses_to_overflow():
    cache = generate.KVCache((1, 2, 4, 8), "cpu", torch.float32)   # (B, KV, max_len, hd)
    k = torch.zeros(1, 2, 3, 8)                                       # (B, KV, T, hd)
    cache.update(0, k, k)
    with pytest.raises(ValueError, match="KV cache holds 4 positions but 6 were requested"):
        cache.update(3, k, k)


def test_shared_prefix_then_batches_of_suffixes_equal_full_forwards():
    """prefill_shared runs a prefix once for every cache row; rows that continue it, in a full batch
    and then a smaller one (the caches' first rows), get the hidden states of their whole rows."""
    model = tiny_model(n_kv_head=2)
    prefix = prompt(model, 1, 7, seed=5)[0]                                       # (P,)
    rows = torch.cat([prefix.expand(5, -1), prompt(model, 5, 6, seed=6)], dim=1)  # (5, P + 6)
    net = generate.with_kv_cache(model, 3, 13)
    with torch.no_grad():
        generate.prefill_shared(net, prefix)
        got = [net.hidden(rows[a:b, 7:], start=7) for a, b in ((0, 3), (3, 5))]
        want = model.hidden(rows)[:, 7:]
    assert torch.allclose(torch.cat(got), want, atol=1e-5)


def test_scoring_copy_gives_the_hidden_states_at_the_chosen_positions():
    """for_scoring runs the last block's output projection and MLP only at the positions set by
    score_at: there the states equal the plain model's, after a shared prefix too."""
    model = tiny_model(n_kv_head=2)
    idx = prompt(model, 3, 10, seed=8)
    idx[:, :4] = idx[0, :4]                                        # a 4-token shared prefix
    rows = torch.tensor([0, 1, 2, 2])
    cols = torch.tensor([5, 0, 2, 5])                              # after the prefix
    net = generate.for_scoring(model, 3, 10)
    with torch.no_grad():
        want = model.hidden(idx)[:, 4:][rows, cols]
        generate.score_at(net, (), ())
        generate.prefill_shared(net, idx[0, :4])
        generate.score_at(net, rows, cols)
        h = net.hidden(idx[:, 4:], start=4)                                 # (3, 6, d_model)
    assert torch.allclose(h[rows, cols], want, atol=1e-5)
    # elsewhere the last MLP did not run: the states differ
    assert not torch.allclose(h[1, 3], model.hidden(idx)[1, 7], atol=1e-3)


# -------------------------------------------------------------------------------------------------
# Compiled decode


def run_decode(model, T, **kw):
    idx = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.inference_mode():
        return torch.cat(list(generate.generate(model, idx, 40, **kw)))


def needs_compiler():
    if not (shutil.which("c++") or shutil.which("g++")):
        skip_or_fail_on_ci("torch.compile on CPU needs a C++ compiler (Debian: apt install g++)")


def test_compiled_decode_equals_eager_with_one_graph_for_every_length():
    """compile_decode (torch.compile, dynamic shapes) must give the eager tokens, greedy and
    sampled, and one compile must serve other prompt lengths and positions: a recompile per length
    would stall every chat turn."""
    needs_compiler()
    torch._dynamo.reset()   # torch keeps one compile cache per code object: start from none
    eager = tiny_model(n_kv_head=2)
    compiled = generate.compile_decode(tiny_model(n_kv_head=2))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # error_on_recompile: a second compile (say, per position) raises instead of passing unnoticed,
    # and so does giving up on compiling and running eagerly after torch's limit of recompiles.
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = run_decode(compiled, 9, temperature=0)                          # the one compile
        assert torch.equal(first, run_decode(eager, 9, temperature=0))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
        for T in (3, 30):
            assert torch.equal(run_decode(compiled, T, temperature=0),
                               run_decode(eager, T, temperature=0))
            kw = dict(temperature=1.0, top_k=50, top_p=0.9, seed=T)
            assert torch.equal(run_decode(compiled, T, **kw), run_decode(eager, T, **kw))


def test_compiled_copy_decodes_with_its_own_weights():
    needs_compiler()
    compiled = generate.compile_decode(tiny_model(n_kv_head=2))
    other = tiny_model(seed=1, n_kv_head=2)
    copied = copy.deepcopy(compiled)
    copied.load_state_dict(other.state_dict())
    assert torch.equal(run_decode(copied, 9, temperature=0), run_decode(other, 9, temperature=0))
    assert not torch.equal(run_decode(copied, 9, temperature=0),
                           run_decode(compiled, 9, temperature=0))


# -------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_with_a_seed_is_reproducible():
    model = tiny_model()
    idx = prompt(model, 3, 5, seed=3)
    a = tokens(model, idx, 30, seed=7)
    assert torch.equal(a, tokens(model, idx, 30, seed=7))
    assert not torch.equal(a, tokens(model, idx, 30, seed=8))


def test_kv_cache_does_not_change_the_sampled_stream():
    model = tiny_model()
    idx = prompt(model, 3, 5, seed=3)
    cached = tokens(model, idx, 30, seed=7)
    assert torch.equal(tokens(model, idx, 30, seed=7, use_cache=False), cached)


def test_top_k_1_is_greedy():
    model = tiny_model()
    idx = prompt(model, 3, 5, seed=3)
    greedy = tokens(model, idx, 30, temperature=0)
    assert torch.equal(tokens(model, idx, 30, temperature=1.3, top_k=1, seed=5), greedy)


def test_nucleus_of_one_token_is_greedy():
    model = tiny_model()
    idx = prompt(model, 3, 5, seed=3)
    greedy = tokens(model, idx, 30, temperature=0)
    assert torch.equal(tokens(model, idx, 30, top_p=1e-6, seed=5), greedy)


def test_top_k_samples_among_the_k_most_likely():
    # Every sampled token is among the 5 most likely at its step (checked against a full forward).
    model = tiny_model()
    idx = prompt(model, 3, 5, seed=3)
    out = tokens(model, idx, 30, top_k=5, seed=9)
    with torch.no_grad():
        logits, _ = model(torch.cat([idx, out[:, :-1]], dim=1))
    top5 = logits[:, idx.shape[1] - 1:].topk(5, dim=-1).indices                        # (B, 30, 5)
    assert (top5 == out[..., None]).any(-1).all()


def test_sample_next_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two (0.5 < 0.7 <= 0.8).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    drawn = generate.sample_next(logits, 1.0, top_p=0.7, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.05


# -------------------------------------------------------------------------------------------------
# Stopping and bad requests


def test_generation_stops_when_every_row_has_a_stop_id():
    model = tiny_model()
    idx = prompt(model, 2, 4, seed=4)
    greedy = tokens(model, idx, 20, temperature=0)                                    # (2, 20)
    stop_a, stop_b = greedy[0, 3].item(), greedy[1, 6].item()
    out = tokens(model, idx, 20, temperature=0, stop_ids=(stop_a, stop_b))
    first = [min(j for j in range(20) if greedy[r, j].item() in (stop_a, stop_b)) for r in range(2)]
    assert out.shape[1] == max(first) + 1
    for r in range(2):
        assert torch.equal(out[r, :first[r] + 1], greedy[r, :first[r] + 1])
        assert (out[r, first[r]:] == greedy[r, first[r]]).all()   # finished rows repeat their stop


def test_generate_rejects_too_long_requests():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate.generate(model, torch.zeros(1, 200, dtype=torch.long), 100)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=0), dict(top_p=0),
                                dict(top_p=1.5)])
def test_generate_rejects_bad_sampling_settings(kw):
    model = tiny_model()
    with pytest.raises(ValueError, match="bad sampling settings"):
        generate.generate(model, torch.zeros(1, 4, dtype=torch.long), 4, **kw)
