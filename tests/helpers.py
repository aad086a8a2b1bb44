"""Tiny models and tokenizers that tests build in-process (nothing is downloaded)."""
from __future__ import annotations

import torch

from convert import llama as llama_convert
from convert.core import state_dict_to_flax
from metamorph_jax.tiny import tiny_tokenizer  # noqa: F401  (re-exported for tests)


def tiny_llama_hf_config(**overrides) -> dict:
    config = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, model_type="llama")
    config.update(overrides)
    return config


def llama_params_from_torch(model: torch.nn.Module, cfg) -> dict:
    return state_dict_to_flax(llama_convert.SPEC, cfg, model.state_dict())
