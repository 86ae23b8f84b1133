"""The LLaDA-8B network: a LLaMA-shaped dense transformer with bidirectional attention, on the shared
decoder (`weights.layers`: fused q/k/v attention, fused gate/up SwiGLU, no QK norm, full rotary).

The checkpoint stores separate projections under `model.transformer.` (`blocks.{i}.q_proj.weight`,
...); each is loaded into its slice of the fused parameter, so the network always runs one product
for q/k/v and one for gate/up, and reading the slices back gives the checkpoint's tensors.
"""

from __future__ import annotations

import torch

from weights.config_llada import LLaDAConfig
from weights.layers import Attention, DecoderLayer, DecoderLM, SwiGLU

PREFIX = "model.transformer."  # every checkpoint tensor name starts with it


class LLaDAModel(DecoderLM):
    def __init__(self, config: LLaDAConfig, tp=None):
        c = config

        def layer():
            attn = Attention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.rms_norm_eps, qk_norm=False,
                             tp=tp)
            return DecoderLayer(c.d_model, c.rms_norm_eps, attn, SwiGLU(c.d_model, c.mlp_hidden_size, tp))

        super().__init__(config, [layer() for _ in range(c.n_layers)], tp)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """In the order of the released checkpoint's layout (embedding, blocks, final norm, head)."""
        out = {PREFIX + "wte.weight": self.embedding}
        for i, layer in enumerate(self.layers):
            p = f"{PREFIX}blocks.{i}."
            q, k, v = layer.attn.q_k_v(layer.attn.qkv)
            gate, up, down = layer.mlp.gate_up_down()
            out.update({
                p + "attn_norm.weight": layer.attn_norm, p + "ff_norm.weight": layer.mlp_norm,
                p + "q_proj.weight": q, p + "k_proj.weight": k, p + "v_proj.weight": v,
                p + "attn_out.weight": layer.attn.out,
                p + "ff_proj.weight": gate, p + "up_proj.weight": up, p + "ff_out.weight": down,
            })
        out[PREFIX + "ln_f.weight"] = self.norm
        out[PREFIX + "ff_out.weight"] = self.lm_head
        return out
