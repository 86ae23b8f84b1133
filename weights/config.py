"""Typed configurations read from a checkpoint's config.json, and the registry that picks the family.

Three families are served: LLaDA-8B (`LLaDAConfig`, here), LLaDA-MoE and LLaDA2.x
(`weights.config_moe`). `config_from_dict` / `read_config` tell them apart by `architectures`
(LLaDA-MoE shares `model_type` "llada" with LLaDA-8B), then by `model_type` and the fields present.

Every config exposes the same serving interface: `family`, `block_diffusion`, `n_layers`,
`n_heads`, `n_kv_heads`, `head_dim`, `hidden_size`, `vocab_size`, `embedding_size`, `max_sequence_length`,
`mask_token_id` / `eos_token_id` (None when the file does not say: the loader reads the tokenizer),
`pad_token_id`, `num_parameters` and `active_parameters`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that this server cannot run; the message names the field."""


def without_nulls(raw: dict) -> dict:
    """config.json with its explicit nulls dropped: a null field means the field is absent, as the
    released configs and their reference code read it (LLaDA-MoE's `shared_expert_intermediate_size:
    null` is no shared expert; `rope_scaling: null` is plain RoPE), so every optional field then takes
    its default and a required one is reported missing."""
    return {k: v for k, v in raw.items() if v is not None}


# Fields whose value must be exactly this for the released LLaDA architecture.
_REQUIRED_VALUES = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "weight_tying": False,
}
# Fields that, when present, must not be truthy (features of other block types).
_INT_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
               "embedding_size", "max_sequence_length", "mask_token_id", "eos_token_id",
               "pad_token_id")
_MUST_BE_OFF = ("include_qkv_bias", "attention_layer_norm", "input_emb_norm", "scale_logits")


@dataclass(frozen=True)
class LLaDAConfig:
    """LLaDA-8B (class LLaDAModelLM): a LLaMA-shaped dense transformer, fully bidirectional."""

    family = "llada"
    block_diffusion = False
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    max_sequence_length: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    rope_full_precision: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_parameters(self) -> int:
        d, h, kv = self.d_model, self.mlp_hidden_size, self.n_kv_heads * self.head_dim
        per_block = 2 * d + d * d * 2 + 2 * kv * d + 3 * d * h
        return self.n_layers * per_block + 2 * self.embedding_size * d + d

    @property
    def active_parameters(self) -> int:
        return self.num_parameters

    @classmethod
    def from_dict(cls, raw: dict) -> "LLaDAConfig":
        raw = without_nulls(raw)
        for name, want in _REQUIRED_VALUES.items():
            if name in raw and raw[name] != want:
                raise ConfigError(
                    f"config.json: unsupported {name}={raw[name]!r}; only {want!r} is supported "
                    "(the released LLaDA architecture)"
                )
        for name in _MUST_BE_OFF:
            if raw.get(name):
                raise ConfigError(f"config.json: unsupported {name}={raw[name]!r}; it must be off")
        model_type = raw.get("model_type", "llada")
        if model_type != "llada":
            raise ConfigError(f"config.json: unsupported model_type={model_type!r}; expected 'llada'")

        n_heads = raw.get("n_heads")
        kv = raw.get("n_kv_heads")
        if kv is None:
            kv = 1 if raw.get("multi_query_attention") else n_heads
        values = {
            "d_model": raw.get("d_model"),
            "n_layers": raw.get("n_layers"),
            "n_heads": n_heads,
            "n_kv_heads": kv,
            "mlp_hidden_size": raw.get("mlp_hidden_size")
            or (raw.get("mlp_ratio", 4) * raw["d_model"] if raw.get("d_model") else None),
            "vocab_size": raw.get("vocab_size"),
            "embedding_size": raw.get("embedding_size") or raw.get("vocab_size"),
            "max_sequence_length": raw.get("max_sequence_length", 4096),
            "mask_token_id": raw.get("mask_token_id"),
            "eos_token_id": raw.get("eos_token_id"),
            "pad_token_id": raw.get("pad_token_id", raw.get("eos_token_id")),
            "rope_theta": float(raw.get("rope_theta", 10000.0)),
            "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-5)),
            "rope_full_precision": bool(raw.get("rope_full_precision", True)),
        }
        for f in fields(cls):
            v = values[f.name]
            if v is None:
                raise ConfigError(f"config.json: missing required field {f.name!r}")
            if f.name in _INT_FIELDS and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"config.json: field {f.name!r} must be an integer, got {v!r}")
        cfg = cls(**values)
        cfg._check()
        return cfg

    def _check(self) -> None:
        positive = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                    "vocab_size", "embedding_size", "max_sequence_length")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"config.json: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config.json: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head dim {self.head_dim} must be even for rotary embeddings")
        if self.embedding_size < self.vocab_size:
            raise ConfigError(
                f"config.json: embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.embedding_size:
                raise ConfigError(f"config.json: {name}={v} is outside the embedding table "
                                  f"(embedding_size={self.embedding_size})")


def config_from_dict(raw: dict):
    """The family's config for a parsed config.json (ConfigError names what is wrong)."""
    from weights.config_moe import LLaDA2Config, LLaDAMoEConfig

    raw = without_nulls(raw)
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"config.json: architectures must be a list, got {archs!r}")
    model_type = raw.get("model_type", "llada")
    if "LLaDA2MoeModelLM" in archs or model_type == "llada2_moe":
        return LLaDA2Config.from_dict(raw)
    if "LLaDAMoEModelLM" in archs or (model_type == "llada" and "num_experts" in raw):
        return LLaDAMoEConfig.from_dict(raw)
    if "LLaDAModelLM" in archs or model_type == "llada":
        return LLaDAConfig.from_dict(raw)
    raise ConfigError(
        f"config.json: unsupported architectures={archs!r} / model_type={model_type!r}; supported: "
        "LLaDAModelLM (llada), LLaDAMoEModelLM (llada), LLaDA2MoeModelLM (llada2_moe)")


def read_config(path: str | Path):
    """Parse a config.json and build its family's config."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_dict(raw)
