"""The family registry: everything the server knows about each family of checkpoints, one record each.

A `Family` names its typed config (which parses config.json), its network (built on the shared
decoder of `weights.layers`), how its config.json is recognised, the tokenizer texts of its mask and
end-of-turn tokens, the released mask / EOS ids used when neither config.json nor the tokenizer
gives them, its batch strategy and the released `generate` its checkpoints ship. `config_from_dict` /
`read_config` pick the family of a config.json; `family_of(config)` finds a config's record.

Adding a family: a config class (fields read with `weights.fields.Fields`, the serving interface
below), a network file (a `DecoderLM` naming its checkpoint tensors), and one record here.

Every config exposes the same serving interface: `family`, `block_diffusion`, `n_layers`,
`n_heads`, `n_kv_heads`, `head_dim`, `rotary_dim`, `hidden_size`, `vocab_size`, `embedding_size`,
`max_sequence_length`, `rope_theta`, `rms_norm_eps`, `tie_word_embeddings`, `mask_token_id` /
`eos_token_id` / `pad_token_id` (None when the file does not say), `num_parameters` and
`active_parameters`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from weights.config_llada import LLaDAConfig
from weights.config_moe import LLaDA2Config, LLaDAMoEConfig
from weights.fields import ConfigError
from weights.model_llada import LLaDAModel
from weights.model_llada2 import LLaDA2Model
from weights.model_llada_moe import LLaDAMoEModel

# The released special ids of LLaDA2.x and LLaDA-MoE (their tokenizer's and `generate`'s defaults).
RELEASED_MOE_EOS_ID = 156892
RELEASED_MOE_MASK_ID = 156895


@dataclass(frozen=True)
class Family:
    config: type                 # the typed config; its `from_dict(raw)` parses config.json
    network: type                # DecoderLM subclass built from the config
    architecture: str            # the class name config.json lists in `architectures`
    model_type: str              # config.json `model_type` (absent or null reads as "llada")
    marker_fields: tuple         # fields (non-null) that tell it apart from a family of the same model_type
    mask_text: str               # tokenizer text of the mask token
    eot_text: str                # tokenizer text of the end-of-turn token
    default_mask_id: int | None  # when neither config.json nor the tokenizer says (None: required)
    default_eos_id: int | None
    decoding: str                # the released `generate` of its checkpoints: "llada" or "llada2.0"
    editing_decoding: str | None  # the one of a checkpoint whose remote code has token editing ("llada2.1")

    @property
    def name(self) -> str:
        return self.config.family

    @property
    def strategy(self) -> str:
        """The sampler's batch strategy: "block_diffusion" (LLaDA2.x) or "llada"."""
        return "block_diffusion" if self.config.block_diffusion else "llada"

    def recognises(self, raw: dict, architectures: list) -> bool:
        model_type = raw.get("model_type")
        if model_type is None:
            model_type = "llada"
        return self.architecture in architectures or (
            model_type == self.model_type and all(raw.get(f) is not None for f in self.marker_fields))


# In the order config.json is matched: LLaDA-MoE shares model_type "llada" with LLaDA-8B and is told
# apart by its class or its `num_experts`, so it comes first.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(config=LLaDA2Config, network=LLaDA2Model, architecture="LLaDA2MoeModelLM",
           model_type="llada2_moe", marker_fields=(), mask_text="<|mask|>", eot_text="<|role_end|>",
           default_mask_id=RELEASED_MOE_MASK_ID, default_eos_id=RELEASED_MOE_EOS_ID,
           decoding="llada2.0", editing_decoding="llada2.1"),
    Family(config=LLaDAMoEConfig, network=LLaDAMoEModel, architecture="LLaDAMoEModelLM",
           model_type="llada", marker_fields=("num_experts",), mask_text="<|mask|>",
           eot_text="<|role_end|>", default_mask_id=RELEASED_MOE_MASK_ID,
           default_eos_id=RELEASED_MOE_EOS_ID, decoding="llada", editing_decoding=None),
    Family(config=LLaDAConfig, network=LLaDAModel, architecture="LLaDAModelLM", model_type="llada",
           marker_fields=(), mask_text="<|mdm_mask|>", eot_text="<|eot_id|>", default_mask_id=None,
           default_eos_id=None, decoding="llada", editing_decoding=None),
)}


def family_of(config) -> Family:
    """The record of a config built by `config_from_dict` (or constructed directly)."""
    return FAMILIES[config.family]


def config_from_dict(raw: dict):
    """The family's config for a parsed config.json (ConfigError names what is wrong)."""
    archs = raw.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"config.json: architectures must be a list, got {archs!r}")
    for fam in FAMILIES.values():
        if fam.recognises(raw, archs):
            return fam.config.from_dict(raw)
    supported = ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())
    raise ConfigError(f"config.json: unsupported architectures={archs!r} / "
                      f"model_type={raw.get('model_type', 'llada')!r}; supported: {supported}")


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
