"""The MoE members of the family: configs, loading, routing and the networks against the golden logits."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_factory import LLADA2_CONFIG, LLADA_MOE_CONFIG, make_moe_checkpoint
from sampler import conformance
from weights.checkpoint import CheckpointError, load_checkpoint
from weights.config_moe import LLaDA2Config, LLaDAMoEConfig
from weights.family import RELEASED_MOE_EOS_ID, RELEASED_MOE_MASK_ID, config_from_dict
from weights.fields import ConfigError
from weights.layers import rms_norm
from weights.moe import route_sigmoid_grouped, route_softmax

from golden_sets import GOLDEN_ROOT as SHARED
LLADA2, LLADA_MOE = SHARED / "tiny-llada2", SHARED / "tiny-llada-moe"


def test_registry_tells_the_families_apart():
    assert isinstance(config_from_dict(json.loads((LLADA2 / "config.json").read_text())), LLaDA2Config)
    moe = json.loads((LLADA_MOE / "config.json").read_text())
    assert moe["model_type"] == "llada"  # the same string as LLaDA-8B: told apart by the class / fields
    assert isinstance(config_from_dict(moe), LLaDAMoEConfig)
    assert isinstance(config_from_dict(dict(moe, architectures=[])), LLaDAMoEConfig)
    with pytest.raises(ConfigError, match="architectures"):
        config_from_dict({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})


@pytest.mark.parametrize("family,field,value", [
    ("llada2", "score_function", "softmax"), ("llada2", "norm_topk_prob", False),
    ("llada2", "moe_router_enable_expert_bias", False), ("llada2", "rope_scaling", {"type": "yarn"}),
    ("llada2", "n_group", 5), ("llada2", "topk_group", 4), ("llada2", "num_experts_per_tok", 13),
    ("llada2", "num_key_value_heads", 3), ("llada2", "partial_rotary_factor", 0.1),
    ("llada2", "first_k_dense_replace", 4), ("llada2", "hidden_size", "48"),
    ("llada2", "num_experts", ...), ("llada2", "mask_token_id", 300), ("llada2", "hidden_act", "gelu"),
    ("llada-moe", "moe_layer_freq", [0, 1]), ("llada-moe", "partial_rotary_factor", -1),
    ("llada-moe", "partial_rotary_factor", ...), ("llada-moe", "num_attention_heads", 5),
    ("llada-moe", "use_qk", None), ("llada-moe", "qk_layernorm", "yes"), ("llada-moe", "clip_qkv", -1.0),
    ("llada-moe", "eos_token_id", 999), ("llada-moe", "num_experts_per_tok", 7),
])
def test_config_errors_name_the_field(family, field, value):
    raw = dict(LLADA2_CONFIG if family == "llada2" else LLADA_MOE_CONFIG)
    raw[field] = value
    raw = {k: v for k, v in raw.items() if v is not ...}
    if field == "use_qk":  # an unknown field is ignored, not an error
        config_from_dict(raw)
        return
    with pytest.raises(ConfigError, match=field):
        config_from_dict(raw)


@pytest.mark.parametrize("directory", [LLADA2, LLADA_MOE])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_golden_forward_logits(directory, dtype, capsys):
    """Both families' networks reproduce the reference logits (with and without the block mask)."""
    bundle = load_checkpoint(directory, "cpu", dtype)
    results = conformance.check_logits(bundle, directory / "forward_logits.safetensors", dtype)
    assert len(results) == (2 if directory == LLADA2 else 1)
    for name, ok, msg in results:
        assert ok, f"{name}: {msg}"
        assert float(msg.split()[3]) < 1e-4  # far inside the file's 1e-3 tolerance


def test_block_causal_logits_differ_from_bidirectional_and_match_their_prefix():
    bundle = load_checkpoint(LLADA2, "cpu", "float64")
    ids = torch.randint(0, 490, (1, 24))
    full = bundle.model.full_logits(ids, block_length=8)[0]
    assert not torch.allclose(full, bundle.model.full_logits(ids)[0])
    # Causal across blocks: the first two blocks' logits do not depend on what follows them.
    assert torch.allclose(full[:16], bundle.model.full_logits(ids[:, :16], block_length=8)[0], atol=1e-12)


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


@pytest.mark.parametrize("directory,victim", [
    (LLADA2, "model.layers.2.mlp.experts.7.up_proj.weight"), (LLADA2, "model.layers.1.mlp.gate.expert_bias"),
    (LLADA_MOE, "model.layers.1.shared_expert.down_proj.weight"), (LLADA_MOE, "model.layers.0.self_attn.k_proj.weight"),
])
def test_missing_and_misshapen_tensors_are_named(tmp_path, directory, victim):
    d = _copy(directory, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][victim]
    tensors = load_file(str(shard))
    shape = list(tensors[victim].shape)
    tensors[victim] = torch.zeros([s + 1 for s in shape])
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, "cpu")
    assert victim in str(e.value) and shard.name in str(e.value) and str(shape) in str(e.value)
    del tensors[victim]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        load_checkpoint(d, "cpu")


def test_special_ids_from_the_tokenizer_then_the_released_defaults(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # No ids in config.json and no tokenizer: the released defaults, refused when outside the vocabulary.
    d = make_moe_checkpoint(tmp_path / "m", "llada2", mask_token_id=..., eos_token_id=...)
    with pytest.raises(CheckpointError, match="mask_token_id=156895"):
        load_checkpoint(d, "cpu")
    big = make_moe_checkpoint(tmp_path / "big", "llada2", mask_token_id=..., eos_token_id=...,
                              vocab_size=157184, hidden_size=16, head_dim=8, intermediate_size=16,
                              moe_intermediate_size=8, num_hidden_layers=2, pad_token_id=156892)
    special = load_checkpoint(big, "cpu").special
    assert (special.mask, special.eos) == (RELEASED_MOE_MASK_ID, RELEASED_MOE_EOS_ID)
    # A tokenizer names them: its ids win over the defaults; <|role_end|> ends a turn.
    vocab = {f"t{i}": i for i in range(280)}
    vocab.update({"<|endoftext|>": 281, "<|mask|>": 282, "<|role_end|>": 283})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    special = load_checkpoint(d, "cpu").special
    assert (special.mask, special.eos, special.eot) == (282, 281, 283)
    assert special.stop == [281, 283]


def test_tied_embeddings_and_biases_load(tmp_path):
    d = make_moe_checkpoint(tmp_path / "tied", "llada2", tie_word_embeddings=True, use_qkv_bias=True,
                            use_bias=True)
    names = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" not in names and "model.layers.0.attention.query_key_value.bias" in names
    bundle = load_checkpoint(d, "cpu", "float64")
    model = bundle.model
    assert model.lm_head is None
    x = torch.randn(5, 48, dtype=torch.float64)
    want = torch.nn.functional.linear(rms_norm(x, model.norm, 1e-6), model.embedding)
    assert torch.allclose(model.head(x), want, atol=1e-12)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.attention.query_key_value.bias"
    stored = load_file(str(d / index[name]))[name].double()
    assert torch.equal(model.layers[0].attn.qkv_bias, stored)


def _plain_sigmoid_router(m, router, bias, top_k, n_group, topk_group, scale):
    """One token at a time, straight from the written rule."""
    ids, ws = [], []
    e = router.shape[0]
    size = e // n_group
    for row in m.double():
        s = [1 / (1 + torch.exp(-(row @ router[j].double()))).item() for j in range(e)]
        b = [s[j] + bias[j].item() for j in range(e)]
        score = [sum(sorted(b[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -score[g])[:topk_group]
        allowed = [j for j in range(e) if j // size in groups]
        chosen = sorted(allowed, key=lambda j: -b[j])[:top_k]
        total = sum(s[j] for j in chosen)
        ids.append(chosen)
        ws.append([s[j] / (total + 1e-20) * scale if top_k > 1 else s[j] * scale for j in chosen])
    return ids, ws


def _plain_softmax_router(m, router, bias, top_k):
    ids, ws = [], []
    for row in m.double():
        p = torch.softmax(router.double() @ row, dim=0)
        if bias is not None:
            p = p + bias.double()
        chosen = sorted(range(len(p)), key=lambda j: -p[j].item())[:top_k]
        ids.append(chosen)
        ws.append([p[j].item() for j in chosen])
    return ids, ws


def _same_choice(ids, w, want_ids, want_w):
    for i in range(len(want_ids)):
        got = dict(zip(ids[i].tolist(), w[i].tolist()))
        assert set(got) == set(want_ids[i]), (i, got, want_ids[i])
        for j, ww in zip(want_ids[i], want_w[i]):
            assert abs(got[j] - ww) < 1e-5


@pytest.mark.parametrize("top_k,n_group,topk_group", [(4, 4, 2), (1, 2, 1), (6, 8, 3), (3, 1, 1)])
def test_sigmoid_grouped_routing_against_a_plain_loop(top_k, n_group, topk_group):
    torch.manual_seed(top_k * 7 + n_group)
    e, d = 16, 24
    m, router, bias = torch.randn(40, d), torch.randn(e, d) / d ** 0.5, 0.3 * torch.randn(e)
    ids, w = route_sigmoid_grouped(m, router, bias, top_k, n_group, topk_group, 2.5)
    assert ids.shape == (40, top_k) and w.dtype == torch.float32
    _same_choice(ids, w, *_plain_sigmoid_router(m, router, bias, top_k, n_group, topk_group, 2.5))
    # The bias chooses but does not weigh: weights are the unbiased scores, renormalised.
    if top_k > 1:
        assert torch.allclose(w.sum(-1), torch.full((40,), 2.5))
    # bf16 inputs route in fp32 all the same.
    ids16, _ = route_sigmoid_grouped(m.bfloat16(), router.bfloat16(), bias, top_k, n_group, topk_group, 2.5)
    ids32, _ = route_sigmoid_grouped(m.bfloat16().float(), router.bfloat16().float(), bias, top_k, n_group,
                                     topk_group, 2.5)
    assert torch.equal(ids16.sort(-1).values, ids32.sort(-1).values)


@pytest.mark.parametrize("with_bias", [False, True])
def test_softmax_routing_against_a_plain_loop(with_bias):
    torch.manual_seed(3)
    e, d = 8, 24
    m, router = torch.randn(40, d), torch.randn(e, d) / d ** 0.5
    bias = 0.05 * torch.randn(e) if with_bias else None
    ids, w = route_softmax(m, router, bias, 2)
    _same_choice(ids, w, *_plain_softmax_router(m, router, bias, 2))
    assert w.dtype == m.dtype
    if not with_bias:  # not renormalised: the two weights sum to less than one
        assert bool((w.sum(-1) < 1).all())


@pytest.mark.parametrize("family", ["llada2", "llada-moe"])
def test_moe_layer_equals_a_dense_all_experts_sum(tmp_path, family):
    """The grouped feed-forward equals the plain formula: every expert on every token, masked by
    the routing weights (computed densely here only as the oracle)."""
    bundle = load_checkpoint(make_moe_checkpoint(tmp_path / family, family, seed=5), "cpu", "float64")
    moe = bundle.model.layers[1].mlp
    m = torch.randn(17, 48, dtype=torch.float64)
    ids, w = moe.route(m, moe.router, moe.expert_bias)
    width = moe.down.shape[2]
    dense = torch.zeros_like(m)
    for e in range(moe.gate_up.shape[0]):
        h = m @ moe.gate_up[e].T
        y = (torch.nn.functional.silu(h[:, :width]) * h[:, width:]) @ moe.down[e].T
        weight = (w * (ids == e)).sum(-1, keepdim=True).to(m.dtype)
        dense += weight * y
    dense += moe.shared(m)
    assert torch.allclose(moe(m), dense, atol=1e-10)
