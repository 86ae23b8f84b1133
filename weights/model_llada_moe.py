"""The LLaDA-MoE network (LLaDA-MoE-7B-A1B): softmax-routed MoE, fully bidirectional like LLaDA-8B.

Separate q/k/v projections in the checkpoint (loaded into one fused product), optional per-head QK
RMSNorm and q/k/v clamp, partial rotary, dense SwiGLU where `moe_layer_freq` is 0 and routed
experts elsewhere, with the shared expert stored on the layer (`model.layers.{i}.shared_expert`).
Any attention mask is ignored by the reference, so this network has none: it is sampled exactly
like LLaDA-8B.
"""

from __future__ import annotations

from functools import partial

import torch

from weights.config_moe import LLaDAMoEConfig
from weights.layers import Attention, DecoderLayer, DecoderLM, SwiGLU
from weights.moe import MoE, route_softmax


class LLaDAMoEModel(DecoderLM):
    def __init__(self, config: LLaDAMoEConfig, tp=None):
        c = config
        route = partial(route_softmax, top_k=c.num_experts_per_tok)

        def layer(i):
            attn = Attention(c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.rms_norm_eps,
                             qk_norm=c.qk_layernorm, qkv_bias=c.attention_bias,
                             out_bias=c.attention_bias, clip=c.clip_qkv, tp=tp)
            if c.is_moe_layer(i):
                mlp = MoE(c.hidden_size, c.num_experts, c.expert_width, c.shared_width, c.expert_bias, route, tp)
            else:
                mlp = SwiGLU(c.hidden_size, c.dense_width, tp)
            return DecoderLayer(c.hidden_size, c.rms_norm_eps, attn, mlp)

        super().__init__(config, [layer(i) for i in range(c.n_layers)], tp)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        out = self.common_tensors("model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a = layer.attn
            out[p + "input_layernorm.weight"] = layer.attn_norm
            out[p + "post_attention_layernorm.weight"] = layer.mlp_norm
            biases = (None,) * 3 if a.qkv_bias is None else a.q_k_v(a.qkv_bias)
            for kind, w, b in zip("qkv", a.q_k_v(a.qkv), biases):
                out[p + f"self_attn.{kind}_proj.weight"] = w
                if b is not None:
                    out[p + f"self_attn.{kind}_proj.bias"] = b
            out[p + "self_attn.o_proj.weight"] = a.out
            if a.out_bias is not None:
                out[p + "self_attn.o_proj.bias"] = a.out_bias
            if a.q_norm is not None:
                out[p + "self_attn.q_norm.weight"] = a.q_norm
                out[p + "self_attn.k_norm.weight"] = a.k_norm
            if isinstance(layer.mlp, MoE):
                out[p + "mlp.gate.weight"] = layer.mlp.router
                if layer.mlp.expert_bias is not None:
                    out[p + "mlp.expert_bias"] = layer.mlp.expert_bias
                out.update(layer.mlp.expert_tensors(p + "mlp.experts."))
                if layer.mlp.shared is not None:
                    out.update(self.swiglu_tensors(p + "shared_expert.", layer.mlp.shared))
            else:
                out.update(self.swiglu_tensors(p + "mlp.", layer.mlp))
        return out
