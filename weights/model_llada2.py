"""The LLaDA2.x network (LLaDA2.0 and 2.1 share it): sigmoid-routed MoE with group-limited routing.

Fused q/k/v, per-head QK RMSNorm before a partial rotary, dense SwiGLU in the first
`first_k_dense_replace` layers and routed experts plus shared experts in the rest. Trained for block
diffusion: the sampler gives it block-causal layouts (`full_logits(ids, block_length=B)` here), the
network itself has no mask of its own. Checkpoint names are the released ones (`model.` prefix,
`lm_head.weight` without it).
"""

from __future__ import annotations

from functools import partial

import torch

from weights.config_moe import LLaDA2Config
from weights.layers import Attention, DecoderLayer, DecoderLM, SwiGLU
from weights.moe import MoE, route_sigmoid_grouped


class LLaDA2Model(DecoderLM):
    def __init__(self, config: LLaDA2Config, tp=None):
        c = config
        route = partial(route_sigmoid_grouped, top_k=c.num_experts_per_tok, n_group=c.n_group,
                        topk_group=c.topk_group, scale=c.routed_scaling_factor)

        def layer(i):
            attn = Attention(c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.rms_norm_eps,
                             qk_norm=c.use_qk_norm, qkv_bias=c.use_qkv_bias, out_bias=c.use_bias, tp=tp)
            if c.is_moe_layer(i):
                mlp = MoE(c.hidden_size, c.num_experts, c.expert_width, c.shared_width, True, route, tp)
            else:
                mlp = SwiGLU(c.hidden_size, c.dense_width, tp)
            return DecoderLayer(c.hidden_size, c.rms_norm_eps, attn, mlp)

        super().__init__(config, [layer(i) for i in range(c.n_layers)], tp)

    def fused_parts(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        qkv = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim)
        out = {}
        for i in range(c.n_layers):
            p = f"model.layers.{i}.attention.query_key_value."
            out[p + "weight"] = out[p + "bias"] = qkv
        return out

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        out = self.common_tensors("model.word_embeddings.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a = layer.attn
            out[p + "input_layernorm.weight"] = layer.attn_norm
            out[p + "post_attention_layernorm.weight"] = layer.mlp_norm
            out[p + "attention.query_key_value.weight"] = a.qkv
            out[p + "attention.dense.weight"] = a.out
            if a.qkv_bias is not None:
                out[p + "attention.query_key_value.bias"] = a.qkv_bias
            if a.out_bias is not None:
                out[p + "attention.dense.bias"] = a.out_bias
            if a.q_norm is not None:
                out[p + "attention.query_layernorm.weight"] = a.q_norm
                out[p + "attention.key_layernorm.weight"] = a.k_norm
            if isinstance(layer.mlp, MoE):
                out[p + "mlp.gate.weight"] = layer.mlp.router
                out[p + "mlp.gate.expert_bias"] = layer.mlp.expert_bias
                out.update(layer.mlp.expert_tensors(p + "mlp.experts."))
                if layer.mlp.shared is not None:
                    out.update(self.swiglu_tensors(p + "mlp.shared_experts.", layer.mlp.shared))
            else:
                out.update(self.swiglu_tensors(p + "mlp.", layer.mlp))
        return out
