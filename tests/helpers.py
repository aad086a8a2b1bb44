"""Tiny models and tokenizers that tests build in-process (nothing is downloaded)."""
from __future__ import annotations

import json

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


def write_tiny_clip(folder):
    """A tiny random transformers CLIPModel folder (offline tokenizer, 32 px images)."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {}
    for suffix in ("", "</w>"):
        for char in "abcdefghijklmnopqrstuvwxyz":
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
