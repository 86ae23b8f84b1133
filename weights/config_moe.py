"""Configurations of the MoE members of the family: LLaDA-MoE-7B-A1B and LLaDA2.x.

Field names are the released config.json's. Fields the reference network reads are typed and
checked; values it cannot run are refused by name; fields it ignores at inference are ignored here
too (listed in each class's docstring); all through the shared reader `weights.fields.Fields`.
`mask_token_id` / `eos_token_id` are optional: the released files do not carry them, and the loader
then reads them from the tokenizer, else takes the family's released ids (`weights.family`).
"""

from __future__ import annotations

from dataclasses import dataclass

from weights.fields import ConfigError, Fields, check_special_ids


def _common(f: Fields) -> dict:
    f.one_of("rope_scaling", (), "only plain RoPE (rope_scaling null) is supported")
    f.one_of("hidden_act", ("silu",), "the network is SwiGLU (hidden_act 'silu')")
    vocab = f.int("vocab_size")
    return dict(
        hidden_size=f.int("hidden_size"), n_layers=f.int("num_hidden_layers"),
        n_heads=f.int("num_attention_heads"), vocab_size=vocab,
        max_sequence_length=f.int("max_position_embeddings", 4096),
        rope_theta=f.float("rope_theta", 10000.0), rms_norm_eps=f.float("rms_norm_eps", 1e-6),
        tie_word_embeddings=f.bool("tie_word_embeddings", False),
        mask_token_id=f.int("mask_token_id", None, low=0),
        eos_token_id=f.int("eos_token_id", None, low=0),
        pad_token_id=f.int("pad_token_id", None, low=0),
    )


def _check_common(cfg) -> None:
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(f"config.json: num_attention_heads={cfg.n_heads} is not a multiple of "
                          f"num_key_value_heads={cfg.n_kv_heads}")
    if cfg.rotary_dim < 2 or cfg.rotary_dim % 2 or cfg.rotary_dim > cfg.head_dim:
        raise ConfigError(f"config.json: partial_rotary_factor={cfg.partial_rotary_factor} gives a "
                          f"rotary width of {cfg.rotary_dim} dims of head_dim {cfg.head_dim}; it must be "
                          "even and between 2 and head_dim")
    if cfg.num_experts_per_tok > cfg.num_experts:
        raise ConfigError(f"config.json: num_experts_per_tok={cfg.num_experts_per_tok} exceeds "
                          f"num_experts={cfg.num_experts}")
    check_special_ids(cfg, cfg.vocab_size, f"vocabulary (vocab_size={cfg.vocab_size})")


class _MoEShape:
    """Parameter counts shared by both MoE configs (from the per-layer widths)."""

    @property
    def embedding_size(self) -> int:
        return self.vocab_size

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def _attn_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        return (self.n_heads + 2 * self.n_kv_heads) * hd * d + d * self.n_heads * hd + 2 * d + 2 * hd

    def _params(self, experts_counted: int) -> int:
        d = self.hidden_size
        total = 0
        for i in range(self.n_layers):
            total += self._attn_params()
            if self.is_moe_layer(i):
                total += self.num_experts * d + experts_counted * 3 * d * self.expert_width
                total += 3 * d * self.shared_width
            else:
                total += 3 * d * self.dense_width
        heads = 1 if self.tie_word_embeddings else 2
        return total + heads * self.vocab_size * d + d

    @property
    def num_parameters(self) -> int:
        return self._params(self.num_experts)

    @property
    def active_parameters(self) -> int:
        """Parameters one token reads: the chosen experts only (the routing matrix in full)."""
        return self._params(self.num_experts_per_tok)


@dataclass(frozen=True)
class LLaDA2Config(_MoEShape):
    """LLaDA2.0 / LLaDA2.1 (LLaDA2MoeModelLM, model_type llada2_moe): sigmoid-routed MoE with
    group-limited routing, QK-norm, partial rotary, trained for block diffusion.

    Ignored as the reference ignores them at inference: rotary_dim (derived from
    partial_rotary_factor), router_dtype (routing is fp32), sliding_window, use_sliding_window,
    max_window_layers, norm_head, norm_softmax, use_rmsnorm, using_split_qkv_in_self_attention,
    the dropouts. Refused: a score_function other than sigmoid, norm_topk_prob false or
    moe_router_enable_expert_bias false (the network always does sigmoid, renormalises and adds
    the expert bias), rope_scaling."""

    family = "llada2"
    block_diffusion = True
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    partial_rotary_factor: float
    vocab_size: int
    max_sequence_length: int
    rope_theta: float
    rms_norm_eps: float
    use_qk_norm: bool
    dense_width: int            # intermediate_size
    first_k_dense_replace: int
    num_experts: int
    num_experts_per_tok: int
    expert_width: int           # moe_intermediate_size
    num_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    use_qkv_bias: bool
    use_bias: bool
    tie_word_embeddings: bool
    mask_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    @property
    def shared_width(self) -> int:
        return self.expert_width * self.num_shared_experts

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict) -> "LLaDA2Config":
        f = Fields(raw)
        f.one_of("score_function", ("sigmoid",), "LLaDA2 routing is sigmoid")
        f.one_of("norm_topk_prob", (True,), "LLaDA2 routing renormalises the chosen weights")
        f.one_of("moe_router_enable_expert_bias", (True,), "LLaDA2 routing uses an expert bias")
        common = _common(f)
        heads = common["n_heads"]
        values = dict(
            common,
            n_kv_heads=f.int("num_key_value_heads", heads),
            head_dim=f.int("head_dim", common["hidden_size"] // heads),
            partial_rotary_factor=f.float("partial_rotary_factor", 1.0, high=1),
            use_qk_norm=f.bool("use_qk_norm", True),
            dense_width=f.int("intermediate_size"),
            first_k_dense_replace=f.int("first_k_dense_replace", 0, low=0),
            num_experts=f.int("num_experts"),
            num_experts_per_tok=f.int("num_experts_per_tok"),
            expert_width=f.int("moe_intermediate_size"),
            num_shared_experts=f.int("num_shared_experts", 0, low=0),
            n_group=f.int("n_group", 1),
            topk_group=f.int("topk_group", 1),
            routed_scaling_factor=f.float("routed_scaling_factor", 1.0),
            use_qkv_bias=f.bool("use_qkv_bias", False),
            use_bias=f.bool("use_bias", False),
        )
        cfg = cls(**values)
        _check_common(cfg)
        if cfg.first_k_dense_replace > cfg.n_layers:
            raise ConfigError(f"config.json: first_k_dense_replace={cfg.first_k_dense_replace} exceeds "
                              f"num_hidden_layers={cfg.n_layers}")
        if cfg.num_experts % cfg.n_group:
            raise ConfigError(f"config.json: num_experts={cfg.num_experts} is not divisible by "
                              f"n_group={cfg.n_group}")
        if cfg.num_experts // cfg.n_group < 2:
            raise ConfigError(f"config.json: n_group={cfg.n_group} leaves fewer than two experts per "
                              "group (a group's score is the sum of its two best experts)")
        if cfg.topk_group > cfg.n_group:
            raise ConfigError(f"config.json: topk_group={cfg.topk_group} exceeds n_group={cfg.n_group}")
        if cfg.num_experts_per_tok > cfg.topk_group * (cfg.num_experts // cfg.n_group):
            raise ConfigError(f"config.json: num_experts_per_tok={cfg.num_experts_per_tok} exceeds the "
                              f"experts of the topk_group={cfg.topk_group} groups kept")
        return cfg


@dataclass(frozen=True)
class LLaDAMoEConfig(_MoEShape):
    """LLaDA-MoE-7B-A1B (LLaDAMoEModelLM; model_type 'llada', told from LLaDA-8B by its class or
    its fields): softmax-routed MoE, fully bidirectional, sampled like LLaDA-8B.

    Ignored as the reference network ignores them: norm_topk_prob, moe_router_score_function,
    routed_scaling_factor, router_num_group, router_topk_group, router_aux_loss_coef."""

    family = "llada-moe"
    block_diffusion = False
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    partial_rotary_factor: float
    vocab_size: int
    max_sequence_length: int
    rope_theta: float
    rms_norm_eps: float
    qk_layernorm: bool
    dense_width: int            # dense_intermediate_size
    expert_width: int           # expert_intermediate_size
    shared_width: int           # shared_expert_intermediate_size (0: no shared expert)
    num_experts: int
    num_experts_per_tok: int
    moe_layer_freq: tuple
    attention_bias: bool
    clip_qkv: float | None
    expert_bias: bool           # moe_router_enable_expert_bias
    tie_word_embeddings: bool
    mask_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.moe_layer_freq[i])

    @classmethod
    def from_dict(cls, raw: dict) -> "LLaDAMoEConfig":
        f = Fields(raw)
        common = _common(f)
        freq = f.int_list("moe_layer_freq", common["n_layers"], "0 = dense layer, otherwise MoE")
        if f.value("partial_rotary_factor", -1) == -1:
            raise ConfigError("config.json: partial_rotary_factor must be set (the reference's "
                              "default -1 cannot run)")
        values = dict(
            common,
            n_kv_heads=f.int("num_key_value_heads", common["n_heads"]),
            partial_rotary_factor=f.float("partial_rotary_factor", high=1),
            qk_layernorm=f.bool("qk_layernorm", False),
            dense_width=f.int("dense_intermediate_size"),
            expert_width=f.int("expert_intermediate_size"),
            shared_width=f.int("shared_expert_intermediate_size", 0, low=0),
            num_experts=f.int("num_experts"),
            num_experts_per_tok=f.int("num_experts_per_tok"),
            moe_layer_freq=freq,
            attention_bias=f.bool("attention_bias", False),
            clip_qkv=f.float("clip_qkv", None),
            expert_bias=f.bool("moe_router_enable_expert_bias", False),
        )
        cfg = cls(**values)
        if cfg.hidden_size % cfg.n_heads:
            raise ConfigError(f"config.json: hidden_size={cfg.hidden_size} is not divisible by "
                              f"num_attention_heads={cfg.n_heads}")
        _check_common(cfg)
        return cfg
