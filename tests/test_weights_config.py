"""Config parsing of every family: the shared typed field reader, the family registry, and an explicit
JSON null read as an absent field (optional fields take their default, required ones are named)."""

import json
from pathlib import Path

import pytest

from ckpt_factory import BASE_CONFIG, LLADA2_CONFIG, LLADA_MOE_CONFIG, make_moe_checkpoint
from weights.checkpoint import checkpoint_shapes, load_checkpoint
from weights.config_llada import LLaDAConfig
from weights.config_moe import LLaDA2Config, LLaDAMoEConfig
from weights.family import FAMILIES, config_from_dict, family_of
from weights.fields import REQUIRED, ConfigError, Fields

from golden_sets import GOLDEN_ROOT as SHARED
LLADA = dict(BASE_CONFIG, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=80,
             vocab_size=200, embedding_size=200, max_sequence_length=256, mask_token_id=190,
             eos_token_id=191, pad_token_id=191)

# Per family: a full config and the fields that must be present (everything else is optional).
FAMILY_CASES = {
    "llada": (LLADA, {"d_model", "n_layers", "n_heads", "vocab_size", "mask_token_id", "eos_token_id"}),
    "llada-moe": (LLADA_MOE_CONFIG, {"hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "vocab_size", "dense_intermediate_size", "expert_intermediate_size",
                                     "num_experts", "num_experts_per_tok", "moe_layer_freq",
                                     "partial_rotary_factor"}),
    "llada2": (LLADA2_CONFIG, {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                               "intermediate_size", "num_experts", "num_experts_per_tok",
                               "moe_intermediate_size"}),
}
# Optional fields the configs above leave out, with a non-default value, per family.
EXTRA_OPTIONAL = {
    "llada": {"multi_query_attention": False, "mlp_ratio": 4, "include_qkv_bias": False,
              "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False},
    "llada-moe": {"hidden_act": "silu"},
    "llada2": {"hidden_act": "silu", "use_qk_norm": False, "num_shared_experts": 2},
}


def _outcome(raw):
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        return str(e)


def _all_fields(family):
    raw, required = FAMILY_CASES[family]
    return dict(raw, **EXTRA_OPTIONAL[family]), required


GOLDEN_SETS = {"llada": "tiny-llada", "llada-moe": "tiny-llada-moe", "llada2": "tiny-llada2"}


@pytest.mark.parametrize("base", ["factory", "golden"])
@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_every_optional_field_may_be_null(family, base):
    """null is the same as absent for every optional field (the same config, or the same refusal when
    the default does not fit the other fields); a required field set to null is named."""
    raw, required = _all_fields(family)
    if base == "golden":
        raw = dict(json.loads((SHARED / GOLDEN_SETS[family] / "config.json").read_text()),
                   **EXTRA_OPTIONAL[family])
    assert config_from_dict(raw).family == family
    for name in raw:
        nulled = dict(raw, **{name: None})
        absent = {k: v for k, v in raw.items() if k != name}
        if name in required:
            for variant in (nulled, absent):
                with pytest.raises(ConfigError, match=name):
                    config_from_dict(variant)
        else:
            assert _outcome(nulled) == _outcome(absent), name
            assert "missing required field" not in str(_outcome(nulled)), name


def test_null_means_the_default():
    llada = config_from_dict(dict(LLADA, pad_token_id=None, n_kv_heads=None, embedding_size=None,
                                  rope_theta=None, block_type=None, model_type=None))
    assert (llada.pad_token_id, llada.n_kv_heads, llada.embedding_size) == (191, 4, 200)
    assert llada.rope_theta == 1e4
    moe = config_from_dict(dict(LLADA_MOE_CONFIG, shared_expert_intermediate_size=None,
                                num_key_value_heads=None, clip_qkv=None, mask_token_id=None))
    assert (moe.shared_width, moe.n_kv_heads, moe.clip_qkv, moe.mask_token_id) == (0, 4, None, None)
    l2 = config_from_dict(dict(LLADA2_CONFIG, head_dim=None, num_shared_experts=None,
                               first_k_dense_replace=None, partial_rotary_factor=None))
    assert (l2.head_dim, l2.num_shared_experts, l2.first_k_dense_replace, l2.rotary_dim) == (12, 0, 0, 12)


def test_a_moe_checkpoint_without_a_shared_expert_loads(tmp_path):
    """LLaDA-MoE's `shared_expert_intermediate_size: null`: no shared expert, no such tensors."""
    d = make_moe_checkpoint(tmp_path / "m", "llada-moe", shared_expert_intermediate_size=None)
    assert json.loads((d / "config.json").read_text())["shared_expert_intermediate_size"] is None
    bundle = load_checkpoint(d, "cpu", "float32")
    assert all(layer.mlp.shared is None for layer in bundle.model.layers[1:])
    assert not any("shared_expert" in n for n in checkpoint_shapes(bundle.config))
    assert bundle.model.full_logits([[1, 2, 3]])[0].shape == (3, 300)


def test_the_registry_tells_every_family_apart():
    golden = {name: json.loads((SHARED / name / "config.json").read_text())
              for name in ("tiny-llada", "tiny-llada-moe", "tiny-llada2")}
    kinds = [type(config_from_dict(raw)) for raw in golden.values()]
    assert kinds == [LLaDAConfig, LLaDAMoEConfig, LLaDA2Config]
    # Without `architectures`: model_type, then LLaDA-MoE's own fields.
    assert isinstance(config_from_dict(dict(golden["tiny-llada-moe"], architectures=None)), LLaDAMoEConfig)
    assert isinstance(config_from_dict(dict(golden["tiny-llada"], architectures=[])), LLaDAConfig)
    assert isinstance(config_from_dict(dict(golden["tiny-llada2"], architectures=[])), LLaDA2Config)
    with pytest.raises(ConfigError, match="LLaDA2MoeModelLM") as e:
        config_from_dict({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    assert "architectures=['MistralForCausalLM']" in str(e.value)
    with pytest.raises(ConfigError, match="architectures must be a list"):
        config_from_dict(dict(golden["tiny-llada"], architectures="LLaDAModelLM"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_record_is_whole(family):
    fam = FAMILIES[family]
    cfg = config_from_dict(_all_fields(family)[0])
    assert family_of(cfg) is fam and isinstance(cfg, fam.config) and fam.name == family
    assert fam.strategy == ("block_diffusion" if family == "llada2" else "llada")
    net = fam.network.__name__
    assert net == {"llada": "LLaDAModel", "llada-moe": "LLaDAMoEModel", "llada2": "LLaDA2Model"}[family]
    assert fam.mask_text in ("<|mdm_mask|>", "<|mask|>") and fam.eot_text in ("<|eot_id|>", "<|role_end|>")
    assert (fam.decoding, fam.editing_decoding) == {"llada": ("llada", None), "llada-moe": ("llada", None),
                                                    "llada2": ("llada2.0", "llada2.1")}[family]
    # Every family's checkpoint layout comes from its network.
    assert checkpoint_shapes(cfg)


def test_the_field_reader():
    f = Fields({"a": 3, "b": True, "c": 2.5, "d": None, "e": [0, 1], "g": "x", "z": 0})
    assert f.int("a") == 3 and f.int("d", 7) == 7 and f.int("d", None) is None and f.int("z", low=0) == 0
    assert f.float("a") == 3.0 and isinstance(f.float("a"), float) and f.float("d", 1.5) == 1.5
    assert f.bool("b", False) is True and f.bool("d", True) is True and f.bool("missing", False) is False
    assert f.int_list("e", 2, "flags") == (0, 1) and f.value("d", "dflt") == "dflt"
    for call, words in [
        (lambda: f.int("d"), "missing required field 'd'"), (lambda: f.int("missing", REQUIRED), "'missing'"),
        (lambda: f.int("b"), "'b' must be an integer"), (lambda: f.int("c"), "'c' must be an integer"),
        (lambda: f.int("z"), "'z' must be >= 1"), (lambda: f.float("g"), "'g' must be a number"),
        (lambda: f.float("b"), "'b' must be a number"), (lambda: f.float("c", high=1), "'c' must be <= 1"),
        (lambda: Fields({"n": -1.0}).float("n"), "'n' must be positive"),
        (lambda: Fields({"n": float("inf")}).float("n"), "'n' must be positive and finite"),
        (lambda: f.bool("a", False), "'a' must be true or false"),
        (lambda: f.int_list("e", 3, "flags"), "e must be a list of 3 integers"),
        (lambda: f.one_of("g", ("y",), "only y"), "unsupported g='x'; only y"),
        (lambda: f.off("b"), "unsupported b=True; it must be off"),
    ]:
        with pytest.raises(ConfigError, match=words):
            call()
    f.one_of("d", ("y",), "null is absent")  # a null is never refused as a value
    f.off("z")


def test_weights_imports_run_one_way():
    """No import circle inside weights/, and no import of a weights module hidden in a function (the
    way circles used to be broken)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "weights"
    graph = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = set(tree.body)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("weights"):
                assert node in top, f"{path.name}: lazy import of {node.module}"
                deps.add(node.module.split(".")[1] if "." in node.module else "__init__")
        graph[path.stem] = deps - {path.stem}
    done: set = set()

    def visit(name, stack):
        assert name not in stack, f"import circle: {' -> '.join(stack + [name])}"
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, stack + [name])
            done.add(name)

    for name in graph:
        visit(name, [])
    assert graph["family"] >= {"config_llada", "config_moe", "model_llada", "model_llada_moe", "model_llada2"}
    assert graph["config_llada"] == graph["config_moe"] == {"fields"}
