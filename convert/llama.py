"""LLaMA-3 / 3.1: transformers LlamaForCausalLM <-> metamorph_jax.models.llama."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from convert.spec import ModelSpec, Rule
from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM

SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings")


def _rope(hf: dict) -> tuple[float, tuple | None]:
    """(theta, llama3 scaling) from either the transformers-5 `rope_parameters` or the
    older `rope_theta` + `rope_scaling` fields."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"field 'rope_type' = {rope_type!r} is not supported "
                         f"(supported: {SUPPORTED_ROPE_TYPES})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("field 'partial_rotary_factor' != 1 is not supported")
    if rope_type == "default":
        return float(theta), None
    missing = [k for k in LLAMA3_ROPE_FIELDS if k not in params]
    if missing:
        raise ValueError(f"llama3 rope scaling lacks field(s) {missing}")
    return float(theta), tuple(sorted((k, params[k]) for k in LLAMA3_ROPE_FIELDS))


def config_from_hf(hf: dict) -> LlamaConfig:
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"field 'model_type' is {hf.get('model_type')!r}, not 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"field 'hidden_act' = {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("attention_dropout", 0.0):
        raise ValueError("field 'attention_dropout' must be 0 (dropout is not implemented)")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"):
        if field not in hf:
            raise ValueError(f"missing field {field!r}")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos,
        pad_token_id=hf.get("pad_token_id"))


def config_to_hf(cfg: LlamaConfig) -> dict:
    rope = {"rope_type": "default" if cfg.rope_scaling is None else "llama3",
            "rope_theta": cfg.rope_theta, **(cfg.rope_scaling_dict or {})}
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": cfg.pad_token_id,
        # transformers >= 5 reads rope_parameters; older releases read the two legacy fields.
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else dict(rope),
    }


def rules(cfg: LlamaConfig) -> list[Rule]:
    layer = "layers" if cfg.scan_layers else "layers_{i}"
    stacked = "i" if cfg.scan_layers else None
    per_layer = [
        ("input_layernorm.weight", "input_layernorm/scale", "copy", 1),
        ("post_attention_layernorm.weight", "post_attention_layernorm/scale", "copy", 1),
        ("self_attn.q_proj.weight", "self_attn/q_proj/kernel", "linear", 1),
        ("self_attn.k_proj.weight", "self_attn/k_proj/kernel", "linear", 1),
        ("self_attn.v_proj.weight", "self_attn/v_proj/kernel", "linear", 1),
        ("self_attn.o_proj.weight", "self_attn/o_proj/kernel", "linear", 2),
        ("self_attn.q_proj.bias", "self_attn/q_proj/bias", "flat", 1),
        ("self_attn.k_proj.bias", "self_attn/k_proj/bias", "flat", 1),
        ("self_attn.v_proj.bias", "self_attn/v_proj/bias", "flat", 1),
        ("self_attn.o_proj.bias", "self_attn/o_proj/bias", "copy", 1),
        ("mlp.gate_proj.weight", "mlp/gate_proj/kernel", "linear", 1),
        ("mlp.up_proj.weight", "mlp/up_proj/kernel", "linear", 1),
        ("mlp.down_proj.weight", "mlp/down_proj/kernel", "linear", 1),
        ("mlp.gate_proj.bias", "mlp/gate_proj/bias", "copy", 1),
        ("mlp.up_proj.bias", "mlp/up_proj/bias", "copy", 1),
        ("mlp.down_proj.bias", "mlp/down_proj/bias", "copy", 1),
    ]
    table = [Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
             Rule("model.norm.weight", "norm/scale")]
    table += [Rule(f"model.layers.{{i}}.{hf}", f"{layer}/{flax}", kind, n_in, stacked)
              for hf, flax, kind, n_in in per_layer]
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding).
    table.append(Rule("lm_head.weight", "lm_head/kernel",
                      "drop" if cfg.tie_word_embeddings else "linear"))
    return table


def param_shapes(cfg: LlamaConfig):
    model = LlamaForCausalLM(cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, positions=tokens))
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                        variables["params"], is_leaf=lambda x: hasattr(x, "value"))


SPEC = ModelSpec(name="llama", config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                 config_from_dict=LlamaConfig.from_dict, rules=rules, param_shapes=param_shapes)
