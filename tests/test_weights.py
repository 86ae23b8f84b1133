"""Checkpoint loading, config validation, tokenizer and chat template, the network itself."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_factory import add_tokenizer, make_checkpoint
from weights.checkpoint import CheckpointError, load_checkpoint
from weights.config_llada import LLaDAConfig
from weights.fields import ConfigError

from golden_sets import TINY_LLADA as GOLDEN


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_golden_forward_logits(dtype):
    ref = load_file(str(GOLDEN / "forward_logits.safetensors"))
    bundle = load_checkpoint(GOLDEN, device="cpu", dtype=dtype)
    got = bundle.model.full_logits(ref["input_ids"]).float()
    assert (got - ref["logits"]).abs().max().item() < 1e-4


def test_ragged_full_logits_match_single():
    bundle = load_checkpoint(GOLDEN, device="cpu", dtype="float32")
    a, b = list(range(5, 17)), list(range(40, 73))
    both = bundle.model.full_logits([a, b])
    assert torch.equal(both[0], bundle.model.full_logits([a])[0])
    assert torch.equal(both[1], bundle.model.full_logits([b])[0])


def test_grouped_query_attention_equals_repeated_heads(tmp_path):
    gqa = load_checkpoint(make_checkpoint(tmp_path / "gqa", n_heads=4, n_kv_heads=2), "cpu", "float64")
    full = load_checkpoint(make_checkpoint(tmp_path / "mha", n_heads=4, n_kv_heads=4), "cpu", "float64")
    hd = gqa.config.head_dim
    src = gqa.model.checkpoint_tensors()
    with torch.no_grad():  # written through the checkpoint names: views of the fused parameters
        for name, p in full.model.checkpoint_tensors().items():
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                p.copy_(src[name].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(p.shape))
            else:
                p.copy_(src[name])
    ids = torch.randint(0, 180, (2, 19))
    assert torch.allclose(gqa.model.full_logits(ids), full.model.full_logits(ids), atol=1e-10)


def _released_llada_forward(t: dict, cfg, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA-8B written out from its released layout (separate projections, one head at a time)."""
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(x, pos):  # x [L, d]
        d = x.shape[-1]
        ang = pos[:, None].double() * cfg.rope_theta ** (-torch.arange(0, d, 2).double() / d)
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        return x * cos + torch.cat((-x[:, d // 2:], x[:, :d // 2]), -1) * sin

    p, hd, group = "model.transformer.", cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    pos = torch.arange(len(ids))
    x = t[p + "wte.weight"][ids]
    for i in range(cfg.n_layers):
        b = f"{p}blocks.{i}."
        n = norm(x, t[b + "attn_norm.weight"])
        q, k, v = (n @ t[b + f"{w}_proj.weight"].T for w in "qkv")
        heads = []
        for h in range(cfg.n_heads):
            kh = slice((h // group) * hd, (h // group + 1) * hd)
            qh, kk = rope(q[:, h * hd:(h + 1) * hd], pos), rope(k[:, kh], pos)
            heads.append(torch.softmax(qh @ kk.T / hd ** 0.5, -1) @ v[:, kh])
        x = x + torch.cat(heads, -1) @ t[b + "attn_out.weight"].T
        m = norm(x, t[b + "ff_norm.weight"])
        gate, up = m @ t[b + "ff_proj.weight"].T, m @ t[b + "up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ t[b + "ff_out.weight"].T
    return norm(x, t[p + "ln_f.weight"]) @ t[p + "ff_out.weight"].T


def test_the_shared_decoder_computes_the_released_network(tmp_path):
    """LLaDA-8B on the shared decoder (fused q/k/v and gate/up) gives the logits of the released
    layout computed directly, and its views read back exactly the checkpoint's tensors."""
    d = make_checkpoint(tmp_path / "m", n_heads=4, n_kv_heads=2, shards=2)
    bundle = load_checkpoint(d, "cpu", "float64")
    stored = {}
    for f in d.glob("*.safetensors"):
        stored.update({k: v.double() for k, v in load_file(str(f)).items()})
    views = bundle.model.checkpoint_tensors()
    assert set(views) == set(stored)
    assert all(torch.equal(views[name], stored[name]) for name in stored)
    layer = bundle.model.layers[0]
    assert layer.attn.qkv.shape == (48 + 2 * 24, 48) and layer.mlp.gate_up.shape == (160, 48)
    ids = torch.randint(0, 180, (17,))
    want = _released_llada_forward(stored, bundle.config, ids)
    assert torch.allclose(bundle.model.full_logits(ids[None])[0], want, atol=1e-10)


def test_sharded_and_single_file_load_the_same(tmp_path):
    one = load_checkpoint(make_checkpoint(tmp_path / "one", shards=1, seed=3), "cpu", "float32")
    three = load_checkpoint(make_checkpoint(tmp_path / "three", shards=3, seed=3), "cpu", "float32")
    for (n1, p1), (n2, p2) in zip(one.model.named_parameters(), three.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("dtype,want", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float32", torch.float32), ("auto", torch.float32)])
def test_dtype_choice(dtype, want):
    assert load_checkpoint(GOLDEN, device="cpu", dtype=dtype).model.embedding.dtype == want


def test_unknown_dtype_is_refused():
    with pytest.raises(CheckpointError, match="unknown dtype"):
        load_checkpoint(GOLDEN, device="cpu", dtype="int8")


def _copy_golden(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(GOLDEN, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_missing_tensor_is_named(tmp_path):
    d = _copy_golden(tmp_path)
    shard = d / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    victim = sorted(tensors)[0]
    del tensors[victim]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, "cpu")
    assert victim in str(e.value) and shard.name in str(e.value)


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path):
    d = _copy_golden(tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    victim = sorted(tensors)[0]
    shape = list(tensors[victim].shape)
    tensors[victim] = torch.zeros([s + 1 for s in shape])
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, "cpu")
    msg = str(e.value)
    assert victim in msg and shard.name in msg and str(shape) in msg


def test_missing_shard_is_named(tmp_path):
    d = _copy_golden(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(d, "cpu")


@pytest.mark.parametrize("field,value", [("alibi", True), ("block_type", "sequential"),
                                         ("include_bias", True), ("layer_norm_type", "default"),
                                         ("activation_type", "gelu"), ("weight_tying", True),
                                         ("include_qkv_bias", True), ("model_type", "llama")])
def test_unsupported_config_field_is_named(tmp_path, field, value):
    d = _copy_golden(tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw[field] = value
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(d, "cpu")


def test_config_shape_errors():
    base = json.loads((GOLDEN / "config.json").read_text())
    with pytest.raises(ConfigError, match="n_heads"):
        LLaDAConfig.from_dict(dict(base, n_heads=5))
    with pytest.raises(ConfigError, match="d_model"):
        LLaDAConfig.from_dict({k: v for k, v in base.items() if k != "d_model"})
    with pytest.raises(ConfigError, match="mask_token_id"):
        LLaDAConfig.from_dict(dict(base, mask_token_id=10_000))


def test_not_a_directory_and_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nope", "cpu")
    (tmp_path / "config.json").write_text((GOLDEN / "config.json").read_text())
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path, "cpu")


def test_tokenizer_and_chat_template(tmp_path):
    d = add_tokenizer(make_checkpoint(tmp_path / "tok", vocab_size=400))
    bundle = load_checkpoint(d, "cpu")
    tok = bundle.tokenizer
    assert tok is not None
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    text = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.token_to_id("<|startoftext|>")
    assert bundle.special.eot == tok.token_to_id("<|eot_id|>")
    assert bundle.special.mask == tok.token_to_id("<|mdm_mask|>") == bundle.config.mask_token_id
    assert bundle.special.stop == [bundle.config.eos_token_id, bundle.special.eot]


def test_checkpoint_without_tokenizer_still_loads():
    bundle = load_checkpoint(GOLDEN, "cpu")
    assert bundle.tokenizer is None and bundle.special.stop == [301]
