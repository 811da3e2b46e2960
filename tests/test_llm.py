"""llm.py against independent references: HF transformers' Llama, no-cache generation, hand-counted sizes."""
import copy
import shutil

import pytest
import torch
import transformers  # the outside reference: a pinned test dependency, so never skipped

from conftest import random_tiny_model, skip_or_fail_on_ci
from llm import LLM, PRESETS, KVCache, ModelConfig, doc_positions_and_mask, model_config


tiny_model = random_tiny_model


# ---------------------------------------------------------------------------------------------------------------
# Parity with Hugging Face's LlamaForCausalLM


@pytest.mark.parametrize("overrides", [
    {},                                                                       # the tiny preset as is (MHA)
    dict(n_kv_head=2, rope_theta=500000.0, tie_embeddings=True, norm_eps=1e-6),   # GQA, tied, other theta/eps
    dict(n_kv_head=1, ffn_hidden=96),                                         # MQA, explicit ffn
])
def test_logits_match_hf_llama(overrides):
    model = tiny_model(**overrides)
    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=c.tie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or c.tie_embeddings)
    assert len(sd) == len(hf.state_dict())          # every HF tensor has exactly one kiln counterpart
    idx = torch.randint(0, c.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    ours, _ = model(idx)
    theirs = hf(idx).logits
    assert ours.abs().max() > 1.0                   # the comparison is not between two near-zero tensors
    assert (ours - theirs).abs().max().item() <= 1e-4
    # Gradients too: q/k/v and gate/up run as one stacked matmul here, as three and two matmuls in HF.
    ours.sin().sum().backward()
    theirs.sin().sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        ref = hf_params[name if name.startswith("lm_head") else "model." + name].grad
        assert p.grad.abs().max() > 0 and torch.allclose(p.grad, ref, rtol=1e-3, atol=1e-4), name


# ---------------------------------------------------------------------------------------------------------------
# Generation


def test_kv_cache_greedy_equals_no_cache_greedy():
    model = tiny_model(n_kv_head=2)
    idx = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    cached = torch.stack(list(model.generate(idx, 50, temperature=0)), dim=1)
    plain = torch.stack(list(model.generate(idx, 50, temperature=0, use_cache=False)), dim=1)
    # A third, independent path: argmax over the full forward, one token at a time.
    seq = idx
    for _ in range(50):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.shape == (2, 50)
    assert torch.equal(cached, plain) and torch.equal(cached, seq[:, 9:])


def test_generation_sees_weights_changed_between_calls():
    # generate stacks q/k/v and gate/up weights once per call (llm.decode_weight): an optimizer step between two calls (as in
    # training-time sampling) must reach the next call. Reference: argmax over full forwards, one token at a time.
    model = tiny_model(n_kv_head=2)
    idx = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    before = torch.stack(list(model.generate(idx, 20, temperature=0)), dim=1)
    with torch.no_grad():                                     # in-place copy_, like an optimizer step
        for p, q in zip(model.parameters(), random_tiny_model(3, n_kv_head=2).parameters()):
            p.copy_(q)
    after = torch.stack(list(model.generate(idx, 20, temperature=0)), dim=1)
    seq = idx
    for _ in range(20):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(after, seq[:, 9:]) and not torch.equal(after, before)


def test_chunked_prefill_equals_one_forward():
    model = tiny_model(n_kv_head=2)
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    cache = KVCache(model.config, 2, 12, x.device, torch.float32)
    with torch.no_grad():
        chunks = [model.hidden(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 12))]
        full = model.hidden(x)
    assert cache.pos == 12
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_compiled_decode_equals_eager_and_compiles_once():
    """compile_decode (torch.compile, dynamic shapes) must give the eager tokens, greedy and sampled, and one
    compile must serve other prompt lengths and positions: a recompile per length would stall every chat turn."""
    if not (shutil.which("c++") or shutil.which("g++")):
        skip_or_fail_on_ci("torch.compile on CPU needs a C++ compiler (Debian: apt install g++)")
    torch._dynamo.reset()   # torch keeps one compile cache per code object: start from none, whatever ran before
    eager = tiny_model(n_kv_head=2)
    compiled = tiny_model(n_kv_head=2).compile_decode()

    def run(model, T, **kw):
        idx = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.inference_mode():
            return torch.cat(list(model.generate(idx, 40, **kw)))

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # error_on_recompile: a second compile (say, per position) raises instead of passing unnoticed, and so does
    # giving up on compiling and running eagerly after torch's limit of recompiles.
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(run(compiled, 9, temperature=0), run(eager, 9, temperature=0))   # the one compile
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
        for T in (3, 30):
            assert torch.equal(run(compiled, T, temperature=0), run(eager, T, temperature=0))
            kw = dict(temperature=1.0, top_k=50, top_p=0.9, seed=T)
            assert torch.equal(run(compiled, T, **kw), run(eager, T, **kw))
    # A copy is compiled too, and decodes with its own weights, not the original's.
    other, copied = tiny_model(seed=1, n_kv_head=2), copy.deepcopy(compiled)
    copied.load_state_dict(other.state_dict())
    assert torch.equal(run(copied, 9, temperature=0), run(other, 9, temperature=0))


def test_sampling_seeded_reproducible_and_top_k_1_is_greedy():
    model = tiny_model()
    idx = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(3))

    def run(**kw):
        return torch.stack(list(model.generate(idx, 30, **kw)), dim=1)

    a, b, c = run(seed=7), run(seed=7), run(seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(seed=7, use_cache=False), a)          # cache does not change the sampled stream
    assert torch.equal(run(temperature=1.3, top_k=1, seed=5), run(temperature=0))
    assert torch.equal(run(top_p=1e-6, seed=5), run(temperature=0))     # nucleus of one token = greedy
    # top_k=5: every sampled token is among the 5 most likely at its step (checked against a full forward).
    out = run(top_k=5, seed=9)
    logits, _ = model(torch.cat([idx, out[:, :-1]], dim=1))
    top5 = logits[:, idx.shape[1] - 1:].topk(5, dim=-1).indices   # (B, 30, 5)
    assert (top5 == out[..., None]).any(-1).all()


def test_generation_stops_when_every_row_has_a_stop_id():
    model = tiny_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(4))
    greedy = torch.stack(list(model.generate(idx, 20, temperature=0)), dim=1)   # (2, 20)
    stop_a, stop_b = greedy[0, 3].item(), greedy[1, 6].item()
    out = torch.stack(list(model.generate(idx, 20, temperature=0, stop_ids=(stop_a, stop_b))), dim=1)
    first = [min(j for j in range(20) if greedy[r, j].item() in (stop_a, stop_b)) for r in range(2)]
    assert out.shape[1] == max(first) + 1
    for r in range(2):
        assert torch.equal(out[r, :first[r] + 1], greedy[r, :first[r] + 1])
        assert (out[r, first[r]:] == greedy[r, first[r]]).all()     # finished rows repeat their stop id


def test_generate_rejects_too_long_requests():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 200, dtype=torch.long), 100)


# ---------------------------------------------------------------------------------------------------------------
# Loss masking and packed documents


def test_masked_positions_change_neither_loss_nor_gradients():
    model = tiny_model()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, V, (2, 16), generator=g)
    targets = torch.randint(0, V, (2, 16), generator=g)
    targets[0, :5] = -1
    loss_mask = torch.ones(2, 16, dtype=torch.long)
    loss_mask[1, 8:] = 0
    ignored = (targets == -1) | (loss_mask == 0)

    def loss_and_grads(t, reduction="mean"):
        model.zero_grad()
        logits, loss = model(idx, t, loss_mask=loss_mask, reduction=reduction)
        loss.backward()
        return logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]

    logits, loss, grads = loss_and_grads(targets)
    perturbed = targets.clone()
    perturbed[1, 8:] = torch.randint(0, V, (8,), generator=g)   # targets under loss_mask 0: any value
    _, loss2, grads2 = loss_and_grads(perturbed)
    assert loss2 == loss and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    # Target -1 acts as mask 0: real targets under mask 0 at those positions give the same loss and gradients,
    # so (with the check above) what a -1 position holds reaches neither the loss nor any gradient.
    swapped, mask2 = targets.clone(), loss_mask.clone()
    swapped[0, :5], mask2[0, :5] = torch.randint(0, V, (5,), generator=g), 0
    model.zero_grad()
    loss3 = model(idx, swapped, loss_mask=mask2)[1]
    loss3.backward()
    assert torch.allclose(loss3, loss, rtol=1e-6)
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7) for a, p in zip(grads, model.parameters()))
    # Independent reference: float64 log-softmax picked at the valid positions only.
    logp = logits.double().log_softmax(-1)
    ref = -logp[~ignored].gather(-1, targets[~ignored][:, None]).mean()
    assert torch.allclose(loss.double(), ref, atol=1e-6)
    _, loss_sum, grads_sum = loss_and_grads(targets, reduction="sum")
    count = (~ignored).sum()
    assert torch.allclose(loss_sum, loss * count, rtol=1e-5)
    assert all(torch.allclose(a * count, b, rtol=1e-5, atol=1e-4) for a, b in zip(grads, grads_sum))


def test_loss_with_no_valid_position_is_zero_not_nan():
    model = tiny_model()
    idx = torch.zeros(1, 4, dtype=torch.long)
    _, loss = model(idx, torch.full((1, 4), -1))
    assert loss.item() == 0.0


def test_doc_positions_and_mask_by_hand():
    pos, mask = doc_positions_and_mask(torch.tensor([[3, 3, 3, 5, 5, 3]]))
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    segment = [0, 0, 0, 1, 1, 2]
    expected = [[j <= i and segment[i] == segment[j] for j in range(6)] for i in range(6)]
    assert mask.shape == (1, 1, 6, 6) and mask[0, 0].tolist() == expected


def test_packed_documents_do_not_see_each_other():
    model = tiny_model(n_kv_head=2)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(6)
    a, b, c = (torch.randint(0, V, (1, n), generator=g) for n in (7, 9, 4))
    packed = torch.cat([a, b, c], dim=1)                                    # (1, 20)
    doc_ids = torch.tensor([[3] * 7 + [5] * 9 + [3] * 4])   # ids may repeat: a document is a contiguous run
    with torch.no_grad():
        logits, _ = model(packed, doc_ids=doc_ids)
        alone = [model(x)[0] for x in (a, b, c)]
        plain, _ = model(packed)
    assert torch.allclose(logits, torch.cat(alone, dim=1), atol=1e-5)
    assert not torch.allclose(plain[:, 7:], logits[:, 7:], atol=1e-3)    # without doc_ids they do interact
    # The loss accepts doc_ids and ignored targets together.
    targets = torch.cat([packed[:, 1:], torch.full((1, 1), -1)], dim=1)
    assert torch.isfinite(model(packed, targets, doc_ids=doc_ids)[1])


# ---------------------------------------------------------------------------------------------------------------
# Sizes, FLOPs and config validation


def hand_count(c: ModelConfig):
    """Non-embedding parameters from the architecture's formula, not from the module tree."""
    attn = c.d_model * c.n_head * c.head_dim * 2 + c.d_model * c.n_kv_head * c.head_dim * 2   # q, o + k, v
    mlp = 3 * c.d_model * c.ffn_hidden
    per_layer = attn + mlp + 2 * c.d_model                                                    # + two norms
    # lm_head's matrix counts (untied: lm_head; tied: the shared table, which does lm_head's matmul).
    return c.n_layer * per_layer + c.d_model + c.vocab_size * c.d_model


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True), dict(n_kv_head=1)])
def test_num_params_matches_parameters(overrides):
    model = LLM(model_config("tiny", **overrides))
    named = list(model.named_parameters(remove_duplicate=False))
    unique = {id(p): p.numel() for _, p in named}
    assert len(named) - len(unique) == int(model.config.tie_embeddings)   # a tied matrix is one parameter
    embed = model.embed_tokens.weight.numel()
    assert model.num_params() == sum(unique.values())
    expected_non_embed = sum(unique.values()) - (0 if model.config.tie_embeddings else embed)
    assert model.num_params(non_embedding=True) == expected_non_embed == hand_count(model.config)


def test_flops_per_token_hand_count():
    model = LLM(model_config("tiny"))
    # tiny: V=512, L=2, H=4, d=64, hd=16, ffn=256 (8/3*64 -> 256), untied.
    n = 2 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64) + 64 + 512 * 64
    assert model.num_params(non_embedding=True) == n
    assert model.flops_per_token(128) == 6 * n + 12 * 2 * 4 * 16 * 128


def test_preset_param_counts():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):                # no memory for the large presets
            model = LLM(model_config(name))
        counts[name] = (model.num_params(), model.num_params(non_embedding=True))
        print(f"{name:>5}: {counts[name][0]:>13,} total, {counts[name][1]:>13,} non-embedding, "
              f"head_dim {model.config.head_dim}, ffn {model.config.ffn_hidden}")
    assert counts["tiny"][0] <= 1_000_000
    assert 7e6 <= counts["demo"][0] <= 12e6
    assert 0.95e9 <= counts["1b"][1] <= 1.1e9
    c1b = model_config("1b")
    assert c1b.head_dim == 128 and c1b.vocab_size % 128 == 0 and c1b.vocab_size <= 65536


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=100, n_head=3), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(vocab_size=70000), "65536"),
    (dict(d_model=60, n_head=4, n_kv_head=4), "even"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_config("tiny", **kwargs)


def test_model_config_round_trips_and_rejects_unknowns():
    c = model_config("1b", max_seq_len=4096)
    again = model_config({f: getattr(c, f) for f in c.__dataclass_fields__})
    assert again == c and again.head_dim == 128
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("2b")
    with pytest.raises(ValueError, match="n_layers"):
        model_config("tiny", n_layers=3)
