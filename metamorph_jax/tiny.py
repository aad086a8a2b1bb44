"""Tiny random models and a word-level tokenizer, for the demo and for tests.

Nothing here is downloaded: the tokenizer is built from a fixed word list with LLaMA-3's
special tokens and chat template.
"""
from __future__ import annotations

from pathlib import Path

def tiny_tokenizer(save_dir: str | Path | None = None):
    """The word-level LLaMA-3-style tokenizer of data/testing.py, optionally saved."""
    from metamorph_jax.data.testing import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer()
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tiny_llama_config(tokenizer, **overrides):
    """A 2-layer LLaMA sized to the tokenizer, ending on its end-of-turn token."""
    from metamorph_jax.models.llama import LlamaConfig
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                  max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                  eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=None)
    fields.update(overrides)
    return LlamaConfig(**fields)
