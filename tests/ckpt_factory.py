"""Build small random LLaDA checkpoints in the Hugging Face layout for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from weights.checkpoint import PREFIX, expected_shapes
from weights.config import LLaDAConfig

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
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight") or name == "ln_f.weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen) / (shape[-1] ** 0.5) * 4
        tensors[PREFIX + name] = t.contiguous()
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    per = (len(names) + shards - 1) // shards
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))
    return path


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
