"""LLaDA-8B's configuration (LLaDAModelLM, model_type 'llada'): the released config.json's field names.

Values the released architecture does not have are refused by name (the block type, the norm, the
activation, biases, ALiBi, tied weights, ...); everything else the network reads is typed and
checked by `weights.fields.Fields`.
"""

from __future__ import annotations

from dataclasses import dataclass

from weights.fields import ConfigError, Fields, check_special_ids

# Fields whose value, when present, must be exactly this for the released LLaDA architecture.
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
_MUST_BE_OFF = ("include_qkv_bias", "attention_layer_norm", "input_emb_norm", "scale_logits")


@dataclass(frozen=True)
class LLaDAConfig:
    """LLaDA-8B (class LLaDAModelLM): a LLaMA-shaped dense transformer, fully bidirectional."""

    family = "llada"
    block_diffusion = False
    tie_word_embeddings = False  # weight_tying is refused
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
    def rotary_dim(self) -> int:
        return self.head_dim

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
        f = Fields(raw)
        for name, want in _REQUIRED_VALUES.items():
            f.one_of(name, (want,), f"only {want!r} is supported (the released LLaDA architecture)")
        for name in _MUST_BE_OFF:
            f.off(name)
        f.one_of("model_type", ("llada",), "expected 'llada'")
        d_model, n_layers, n_heads = f.int("d_model"), f.int("n_layers"), f.int("n_heads")
        n_kv_heads, mlp_hidden_size = f.int("n_kv_heads", None), f.int("mlp_hidden_size", None)
        if n_kv_heads is None:  # the fallbacks are read only when needed, as the reference does
            n_kv_heads = 1 if f.bool("multi_query_attention", False) else n_heads
        if mlp_hidden_size is None:
            mlp_hidden_size = f.int("mlp_ratio", 4) * d_model
        vocab = f.int("vocab_size")
        embedding_size = f.int("embedding_size", vocab)
        max_sequence_length = f.int("max_sequence_length", 4096)
        mask, eos = f.int("mask_token_id", low=0), f.int("eos_token_id", low=0)
        cfg = cls(
            d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            mlp_hidden_size=mlp_hidden_size, vocab_size=vocab, embedding_size=embedding_size,
            max_sequence_length=max_sequence_length, mask_token_id=mask, eos_token_id=eos,
            pad_token_id=f.int("pad_token_id", eos, low=0),
            rope_theta=f.float("rope_theta", 10000.0), rms_norm_eps=f.float("rms_norm_eps", 1e-5),
            rope_full_precision=f.bool("rope_full_precision", True),
        )
        cfg._check()
        return cfg

    def _check(self) -> None:
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
        check_special_ids(self, self.embedding_size, f"embedding table (embedding_size={self.embedding_size})")
