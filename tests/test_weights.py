"""Checkpoint loading, config validation, tokenizer and chat template, the network itself."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_factory import add_tokenizer, make_checkpoint
from weights.checkpoint import CheckpointError, load_checkpoint
from weights.config import ConfigError, LLaDAConfig

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
    gqa = load_checkpoint(make_checkpoint(tmp_path / "gqa", n_heads=4, n_kv_heads=2), "cpu", "float64",
                          fuse=False)
    full = load_checkpoint(make_checkpoint(tmp_path / "mha", n_heads=4, n_kv_heads=4), "cpu", "float64",
                           fuse=False)
    hd = gqa.config.head_dim
    with torch.no_grad():
        for name, p in full.model.named_parameters():
            src = dict(gqa.model.named_parameters())[name]
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                p.copy_(src.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(p.shape))
            else:
                p.copy_(src)
    ids = torch.randint(0, 180, (2, 19))
    assert torch.allclose(gqa.model.full_logits(ids), full.model.full_logits(ids), atol=1e-10)


def test_fused_projections_give_the_same_logits(tmp_path):
    d = make_checkpoint(tmp_path / "m", n_heads=4, n_kv_heads=2)
    fused = load_checkpoint(d, "cpu", "float64")
    plain = load_checkpoint(d, "cpu", "float64", fuse=False)
    assert fused.model.blocks[0].qkv is not None and plain.model.blocks[0].qkv is None
    ids = torch.randint(0, 180, (3, 17))
    assert torch.allclose(fused.model.full_logits(ids), plain.model.full_logits(ids), atol=1e-12)


def test_sharded_and_single_file_load_the_same(tmp_path):
    one = load_checkpoint(make_checkpoint(tmp_path / "one", shards=1, seed=3), "cpu", "float32")
    three = load_checkpoint(make_checkpoint(tmp_path / "three", shards=3, seed=3), "cpu", "float32")
    for (n1, p1), (n2, p2) in zip(one.model.named_parameters(), three.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("dtype,want", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float32", torch.float32), ("auto", torch.float32)])
def test_dtype_choice(dtype, want):
    assert load_checkpoint(GOLDEN, device="cpu", dtype=dtype).model.wte.weight.dtype == want


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
