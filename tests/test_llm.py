"""llm.py against independent references: HF transformers' Llama, a float64 loss, documents run
alone, hand-counted sizes. Generation's tests are in test_generate.py."""
import pytest
import torch
import transformers  # the outside reference: a pinned test dependency, so never skipped

from conftest import random_tiny_model
from llm import LLM, PRESETS, ModelConfig, doc_mask, doc_positions, model_config


tiny_model = random_tiny_model


# -------------------------------------------------------------------------------------------------
# Parity with Hugging Face's LlamaForCausalLM


HF_CASES = [
    {},                                                            # the tiny preset as is (MHA)
    dict(n_kv_head=2, rope_theta=500000.0, tie_embeddings=True, norm_eps=1e-6),   # GQA, tied
    dict(n_kv_head=1, ffn_hidden=96),                              # MQA, explicit ffn
]


def ours_and_hf(overrides):
    """A random tiny kiln model, HF's LlamaForCausalLM with its weights, and both logits on one
    batch (with their graphs, for backward)."""
    model = tiny_model(**overrides)
    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {(k if k.startswith("lm_head") else "model." + k): v
          for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert not missing or c.tie_embeddings
    assert len(sd) == len(hf.state_dict())      # every HF tensor has exactly one kiln counterpart
    idx = torch.randint(0, c.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    return model, hf, model(idx)[0], hf(idx).logits


@pytest.mark.parametrize("overrides", HF_CASES)
def test_logits_match_hf_llama(overrides):
    _, _, ours, theirs = ours_and_hf(overrides)
    assert ours.abs().max() > 1.0               # the comparison is not between near-zero tensors
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("overrides", HF_CASES)
def test_gradients_match_hf_llama(overrides):
    # q/k/v run as three matmuls whose outputs are concatenated here, as three separate ones in HF.
    model, hf, ours, theirs = ours_and_hf(overrides)
    ours.sin().sum().backward()
    theirs.sin().sum().backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        ref = hf_params[name if name.startswith("lm_head") else "model." + name].grad
        assert p.grad.abs().max() > 0 and torch.allclose(p.grad, ref, rtol=1e-3, atol=1e-4), name


# -------------------------------------------------------------------------------------------------
# Loss masking and packed documents


def masked_batch():
    """A tiny model and a batch whose targets are -1 at row 0's first 5 positions and whose
    loss_mask is 0 from row 1's position 8 on."""
    model = tiny_model()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, V, (2, 16), generator=g)
    targets = torch.randint(0, V, (2, 16), generator=g)
    targets[0, :5] = -1
    loss_mask = torch.ones(2, 16, dtype=torch.long)
    loss_mask[1, 8:] = 0
    return model, idx, targets, loss_mask


def loss_and_grads(model, idx, targets, loss_mask, reduction="mean"):
    model.zero_grad()
    _, loss = model(idx, targets, loss_mask=loss_mask, reduction=reduction)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_masked_positions_change_neither_loss_nor_gradients():
    model, idx, targets, loss_mask = masked_batch()
    loss, grads = loss_and_grads(model, idx, targets, loss_mask)
    perturbed = targets.clone()
    g = torch.Generator().manual_seed(8)
    perturbed[1, 8:] = torch.randint(0, model.config.vocab_size, (8,), generator=g)  # under mask 0
    loss2, grads2 = loss_and_grads(model, idx, perturbed, loss_mask)
    assert loss2 == loss
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_target_minus_one_acts_as_mask_zero():
    # Real targets under mask 0 at the -1 positions give the same loss and gradients, so (with the
    # test above) what a -1 position holds reaches neither the loss nor any gradient.
    model, idx, targets, loss_mask = masked_batch()
    loss, grads = loss_and_grads(model, idx, targets, loss_mask)
    swapped = targets.clone()
    mask2 = loss_mask.clone()
    g = torch.Generator().manual_seed(9)
    swapped[0, :5] = torch.randint(0, model.config.vocab_size, (5,), generator=g)
    mask2[0, :5] = 0
    loss3, grads3 = loss_and_grads(model, idx, swapped, mask2)
    assert torch.allclose(loss3, loss, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads3))


def test_masked_loss_equals_float64_reference():
    # Independent reference: float64 log-softmax picked at the valid positions only.
    model, idx, targets, loss_mask = masked_batch()
    loss, _ = loss_and_grads(model, idx, targets, loss_mask)
    with torch.no_grad():
        logits, _ = model(idx)
    valid = (targets != -1) & (loss_mask != 0)
    logp = logits.double().log_softmax(-1)
    ref = -logp[valid].gather(-1, targets[valid][:, None]).mean()
    assert torch.allclose(loss.double(), ref, atol=1e-6)


def test_sum_reduction_is_mean_times_valid_count():
    model, idx, targets, loss_mask = masked_batch()
    loss, grads = loss_and_grads(model, idx, targets, loss_mask)
    loss_sum, grads_sum = loss_and_grads(model, idx, targets, loss_mask, reduction="sum")
    count = ((targets != -1) & (loss_mask != 0)).sum()
    assert torch.allclose(loss_sum, loss * count, rtol=1e-5)
    assert all(torch.allclose(a * count, b, rtol=1e-5, atol=1e-4) for a, b in zip(grads, grads_sum))


def test_loss_with_no_valid_position_is_zero_not_nan():
    model = tiny_model()
    idx = torch.zeros(1, 4, dtype=torch.long)
    _, loss = model(idx, torch.full((1, 4), -1))
    assert loss.item() == 0.0


def test_doc_positions_and_mask_by_hand():
    pos, segment = doc_positions(torch.tensor([[3, 3, 3, 5, 5, 3]]))
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert segment.tolist() == [[1, 1, 1, 2, 2, 3]]
    mask = doc_mask(segment, flex=False)
    segment = [0, 0, 0, 1, 1, 2]
    expected = [[j <= i and segment[i] == segment[j] for j in range(6)] for i in range(6)]
    assert mask.shape == (1, 1, 6, 6) and mask[0, 0].tolist() == expected


def packed_documents():
    """A tiny GQA model, three documents, and them packed in one row with their doc_ids."""
    model = tiny_model(n_kv_head=2)
    g = torch.Generator().manual_seed(6)
    docs = [torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in (7, 9, 4)]
    packed = torch.cat(docs, dim=1)                                             # (1, 20)
    doc_ids = torch.tensor([[3] * 7 + [5] * 9 + [3] * 4])   # ids repeat: a doc is a contiguous run
    return model, docs, packed, doc_ids


def test_packed_documents_do_not_see_each_other():
    model, docs, packed, doc_ids = packed_documents()
    with torch.no_grad():
        logits, _ = model(packed, doc_ids=doc_ids)
        alone = [model(x)[0] for x in docs]
        plain, _ = model(packed)
    assert torch.allclose(logits, torch.cat(alone, dim=1), atol=1e-5)
    assert not torch.allclose(plain[:, 7:], logits[:, 7:], atol=1e-3)   # without doc_ids they mix


def test_loss_takes_doc_ids_with_ignored_targets():
    model, _, packed, doc_ids = packed_documents()
    targets = torch.cat([packed[:, 1:], torch.full((1, 1), -1)], dim=1)
    assert torch.isfinite(model(packed, targets, doc_ids=doc_ids)[1])


# -------------------------------------------------------------------------------------------------
# Sizes, FLOPs and config validation


def hand_count(c: ModelConfig):
    """Non-embedding parameters from the architecture's formula, not from the module tree."""
    q_o = c.d_model * c.n_head * c.head_dim * 2
    k_v = c.d_model * c.n_kv_head * c.head_dim * 2
    mlp = 3 * c.d_model * c.ffn_hidden
    per_layer = q_o + k_v + mlp + 2 * c.d_model                                 # + two norms
    # lm_head's matrix counts (untied: lm_head; tied: the shared table, which does its matmul).
    return c.n_layer * per_layer + c.d_model + c.vocab_size * c.d_model


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True), dict(n_kv_head=1)])
def test_num_params_matches_parameters(overrides):
    model = LLM(model_config("tiny", **overrides))
    named = list(model.named_parameters(remove_duplicate=False))
    unique = {id(p): p.numel() for _, p in named}
    assert len(named) - len(unique) == int(model.config.tie_embeddings)   # a tied matrix: one param
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
    (dict(d_model=60, n_head=4, n_kv_head=4), "even"),
    (dict(n_layer=0), "positive integer"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_config("tiny", **kwargs)


def test_vocab_size_is_not_limited_by_shards():
    # A model is not a shard: the uint16 limit of token shards is checked by shards.py alone.
    with torch.device("meta"):
        model = LLM(model_config("tiny", vocab_size=70000))
    assert model.lm_head.weight.shape == (70000, 64)


def test_model_config_round_trips():
    c = model_config("1b", max_seq_len=4096)
    again = model_config({f: getattr(c, f) for f in c.__dataclass_fields__})
    assert again == c and again.head_dim == 128


def test_model_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("2b")
    with pytest.raises(ValueError, match="n_layers"):
        model_config("tiny", n_layers=3)
