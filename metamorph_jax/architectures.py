"""Named model architectures: the config of a model folder (`{"model", "config"}` as
pretrained.read_model_config gives it) without the folder and without weights.

A compile-only plan (training/plan.py, `train.py --plan TOPOLOGY`) builds every stage
from abstract shapes; where a stage's model folder is absent, its `init.llm_arch`,
`init.vision_arch` or `init.model_arch` names one of these instead. Real runs never read
them: they read the folders.

    llama3.1_8b, llama3.1_70b   Meta's Llama-3.1 config.json files (vocab 128256, RoPE
                                theta 500000 with the "llama3" scaling: factor 8, low 1,
                                high 4, original 8192 positions)
    siglip_so400m               google/siglip-so400m-patch14-384's vision tower, with
                                MetaMorph's 64 visual tokens (the 27x27 grid resized to
                                8x8, L2-normalised; REFERENCE.md, "Model")

`register` adds more (tests register tiny ones).
"""
from __future__ import annotations

import copy

from metamorph_jax.input_errors import InputError

LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama31(hidden: int, layers: int, heads: int, mlp: int) -> dict:
    # LlamaConfig field names (models/llama.py); the values of Meta's config.json.
    return {"model": "llama", "config": dict(
        vocab_size=128256, hidden_size=hidden, intermediate_size=mlp, num_layers=layers,
        num_heads=heads, num_kv_heads=8, head_dim=hidden // heads, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(LLAMA31_ROPE), max_position_embeddings=131072,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=128000, eos_token_ids=[128001, 128008, 128009], pad_token_id=None)}


ARCHITECTURES: dict[str, dict] = {
    "llama3.1_8b": _llama31(hidden=4096, layers=32, heads=32, mlp=14336),
    "llama3.1_70b": _llama31(hidden=8192, layers=80, heads=64, mlp=28672),
    # SiglipConfig field names (models/siglip.py); patch 14 at 384 pixels: a 27x27 grid.
    "siglip_so400m": {"model": "siglip", "config": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, num_channels=3, image_size=384, patch_size=14,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, use_head=True,
        visual_token_layer=-1, num_visual_tokens=64, normalize_visual_tokens=True)},
}


class UnknownArchitecture(InputError, KeyError):
    """A config names an architecture this table does not have."""


def get(name: str) -> dict:
    """A copy of architecture `name` ({"model": kind, "config": fields})."""
    if name not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown architecture {name!r}; known: "
                                  f"{sorted(ARCHITECTURES)}")
    return copy.deepcopy(ARCHITECTURES[name])


def register(name: str, model: str, config: dict) -> None:
    """Adds (or replaces) an architecture: `model` is the folder kind ("llama", "siglip",
    "metamorph"), `config` its model config's fields."""
    ARCHITECTURES[name] = {"model": model, "config": copy.deepcopy(dict(config))}


def names() -> list[str]:
    return sorted(ARCHITECTURES)
