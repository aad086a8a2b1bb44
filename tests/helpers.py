"""Tiny models and tokenizers that tests build in-process (nothing is downloaded)."""
from __future__ import annotations

import numpy as np
import torch
from flax import traverse_util

from convert import llama as llama_convert
from convert.spec import to_flax
from metamorph_jax.tiny import tiny_tokenizer  # noqa: F401  (re-exported for tests)


def tiny_llama_hf_config(**overrides) -> dict:
    config = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, model_type="llama")
    config.update(overrides)
    return config


def torch_state_to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def params_through_rules(spec_rules, state: dict[str, np.ndarray], shapes: dict) -> dict:
    """Maps a state dict through a rule table in memory (the converter does this on files)."""
    from convert.core import _match
    flat_shapes = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
    flat = {}
    for name, array in state.items():
        hit = _match(spec_rules, name, "hf_regex")
        assert hit is not None, name
        rule, groups = hit
        if rule.kind == "drop":
            continue
        index = int(groups.pop(rule.stacked)) if rule.stacked else None
        path = rule.flax.format(**groups)
        full = flat_shapes[path]
        if index is None:
            flat[path] = to_flax(rule, array, full)
        else:
            flat.setdefault(path, np.zeros(full, array.dtype))[index] = to_flax(rule, array, full[1:])
    assert set(flat) == set(flat_shapes), set(flat_shapes) ^ set(flat)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def llama_params_from_torch(model: torch.nn.Module, cfg) -> dict:
    return params_through_rules(llama_convert.rules(cfg), torch_state_to_numpy(model),
                                llama_convert.param_shapes(cfg))

