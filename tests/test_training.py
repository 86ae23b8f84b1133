"""training/train.py on the fused network: it initialises and saves through the checkpoint's tensor
names (views of the fused projections), trains every parameter, and what it saves loads back exactly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))

import train  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from weights import default_model_path  # noqa: E402
from weights.checkpoint import load_checkpoint  # noqa: E402

MODEL = default_model_path()


def test_save_model_writes_the_checkpoint_it_was_loaded_from(tmp_path):
    bundle = load_checkpoint(MODEL, "cpu", "float32")
    config = json.loads((MODEL / "config.json").read_text())
    train.save_model(bundle.model, config, Tokenizer.from_file(str(MODEL / "tokenizer.json")), tmp_path)
    original = load_file(str(MODEL / "model.safetensors"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(original)
    assert all(torch.equal(saved[name], original[name]) for name in original)
    again = load_checkpoint(tmp_path, "cpu", "float32")
    ids = torch.randint(0, 475, (2, 21))
    assert torch.equal(again.model.full_logits(ids), bundle.model.full_logits(ids))


def test_init_weights_by_checkpoint_name():
    config = json.loads((MODEL / "config.json").read_text())
    model = train.LLaDAModel(train.LLaDAConfig.from_dict(config))
    train.init_weights(model, config["n_layers"], torch.Generator().manual_seed(0))
    t = model.checkpoint_tensors()
    p = "model.transformer."
    assert torch.equal(t[p + "ln_f.weight"], torch.ones(128))
    assert torch.equal(t[p + "blocks.2.ff_norm.weight"], torch.ones(128))
    residual = 0.02 / math.sqrt(2 * config["n_layers"])
    for name, want in ((p + "blocks.0.attn_out.weight", residual), (p + "blocks.3.ff_out.weight", residual),
                       (p + "ff_out.weight", 0.02), (p + "blocks.1.k_proj.weight", 0.02),
                       (p + "wte.weight", 0.02)):
        assert abs(t[name].std().item() / want - 1) < 0.1, name
    # The views wrote the fused parameters: no row of q/k/v or gate/up was left uninitialised.
    layer = model.layers[1]
    for fused in (layer.attn.qkv, layer.mlp.gate_up):
        assert abs(fused.std().item() / 0.02 - 1) < 0.1


def test_a_training_step_reaches_every_parameter():
    bundle = load_checkpoint(MODEL, "cpu", "float32")
    model = bundle.model.requires_grad_(True).train()
    ids = torch.randint(3, 475, (4, 24), generator=torch.Generator().manual_seed(1))
    loss = train.pretrain_loss(model, ids, bundle.special.mask, torch.Generator().manual_seed(2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
