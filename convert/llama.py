"""LLaMA-3 / 3.1: transformers LlamaForCausalLM <-> metamorph_jax.models.llama (the tensor
table; config.json translation is LlamaConfig.from_hf / to_hf beside the model)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from convert.spec import ModelSpec, Rule
from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM


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


SPEC = ModelSpec(name="llama", config_from_hf=LlamaConfig.from_hf,
                 config_to_hf=LlamaConfig.to_hf,
                 config_from_dict=LlamaConfig.from_dict, rules=rules, param_shapes=param_shapes)
