"""Build small random LLaDA checkpoints in the Hugging Face layout for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from weights.checkpoint import checkpoint_shapes
from weights.config_llada import LLaDAConfig

BASE_CONFIG = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
    "alibi": False, "block_type": "llama", "include_bias": False, "layer_norm_type": "rms",
    "rope": True, "rope_full_precision": True, "weight_tying": False, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "flash_attention": False, "init_device": "meta",
}


def make_checkpoint(path, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=80,
                    vocab_size=200, max_sequence_length=256, shards=1, seed=0, std=0.5,
                    extra_config=None) -> Path:
    """A random-weight checkpoint; large init std so the logits are far from ties."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = dict(BASE_CONFIG, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
               mlp_hidden_size=mlp_hidden_size, vocab_size=vocab_size, embedding_size=vocab_size,
               max_sequence_length=max_sequence_length, mask_token_id=vocab_size - 10,
               eos_token_id=vocab_size - 9, pad_token_id=vocab_size - 9)
    raw.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    cfg = LLaDAConfig.from_dict(raw)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if name.endswith(("norm.weight", "ln_f.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen) / (shape[-1] ** 0.5) * 4
        tensors[name] = t.contiguous()
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    return write_shards(path, tensors, shards)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>"]


def add_tokenizer(path, corpus=None) -> Path:
    """Train a tiny BPE tokenizer.json and write tokenizer_config.json with a chat template.

    The checkpoint's vocabulary must hold it; the config's mask/eos ids are rewritten to match."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=raw["vocab_size"] - 20, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = corpus or ["the quick brown fox jumps over the lazy dog", "hello world", "one two three"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}))
    raw["mask_token_id"] = tok.token_to_id("<|mdm_mask|>")
    raw["eos_token_id"] = raw["pad_token_id"] = tok.token_to_id("<|endoftext|>")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


LLADA2_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "hidden_size": 48,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
    "partial_rotary_factor": 0.5, "rope_theta": 600000, "rope_scaling": None, "rms_norm_eps": 1e-6,
    "use_qk_norm": True, "intermediate_size": 96, "first_k_dense_replace": 1, "num_experts": 12,
    "num_experts_per_tok": 3, "moe_intermediate_size": 24, "num_shared_experts": 1, "n_group": 3,
    "topk_group": 2, "routed_scaling_factor": 2.5, "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True, "router_dtype": "fp32", "norm_topk_prob": True,
    "use_qkv_bias": False, "use_bias": False, "tie_word_embeddings": False, "vocab_size": 300,
    "max_position_embeddings": 512, "pad_token_id": 290, "eos_token_id": 290, "mask_token_id": 293,
}
LLADA_MOE_CONFIG = {
    "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "hidden_size": 48,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "dense_intermediate_size": 96, "expert_intermediate_size": 24, "shared_expert_intermediate_size": 40,
    "num_experts": 6, "num_experts_per_tok": 2, "moe_layer_freq": [0, 1, 1], "qk_layernorm": True,
    "partial_rotary_factor": 0.5, "rope_theta": 50000, "rope_scaling": None, "rms_norm_eps": 1e-5,
    "attention_bias": False, "clip_qkv": None, "moe_router_enable_expert_bias": False,
    "tie_word_embeddings": False, "vocab_size": 300, "max_position_embeddings": 512,
    "pad_token_id": 290, "eos_token_id": 290, "mask_token_id": 293,
}


def make_moe_checkpoint(path, family: str = "llada2", seed: int = 0, shards: int = 2, **overrides) -> Path:
    """A random-weight LLaDA2.x (`family="llada2"`) or LLaDA-MoE checkpoint with the released
    tensor names, scaled like the golden sets (varied outputs, [MASK] never the argmax)."""
    from weights.family import config_from_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = dict(LLADA2_CONFIG if family == "llada2" else LLADA_MOE_CONFIG, **overrides)
    raw = {k: v for k, v in raw.items() if v is not ...}  # `field=...` drops a field
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    cfg = config_from_dict(raw)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if name.endswith(("layernorm.weight", "norm.weight")):
            sharp = 3 if ("query" in name or "key" in name or "q_norm" in name or "k_norm" in name) else 1
            t = 1.0 + 0.1 * sharp * torch.randn(shape, generator=gen)
        elif name.endswith("expert_bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(("embed_tokens.weight", "word_embeddings.weight")):
            t = torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            t = 3 * torch.randn(shape, generator=gen) / shape[1] ** 0.5
            t[cfg.mask_token_id] = 0
            t[cfg.eos_token_id] *= 1.3  # so that EOS turns up
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        tensors[name] = t.contiguous()
    return write_shards(path, tensors, shards)


def write_shards(path, tensors: dict, shards: int):
    """The tensors in `shards` safetensors files (names sorted, split evenly) with their index."""
    names = sorted(tensors)
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))
    return path
