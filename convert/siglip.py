"""SigLIP vision tower <-> Hugging Face SiglipVisionModel: the name table.

`python -m convert to-flax siglip HF_DIR OUT_DIR` reads a SiglipVisionModel
checkpoint, or a full SiglipModel one (its text tower and logit scale/bias are
skipped with a notice); `python -m convert to-hf siglip OUT_DIR HF_DIR` writes a
SiglipVisionModel that transformers loads. The generic machinery (streaming,
dtypes, pickle policy) is convert/core.py; this file is data.
"""
from __future__ import annotations

import dataclasses
import re

from convert.spec import ModelSpec, Rule
from metamorph_jax.models import siglip

# Where the vision tower's tensors sit under "vision_model.": a full SiglipModel checkpoint,
# and SiglipVisionModel checkpoints saved by transformers 4.x. transformers 5 saves a
# SiglipVisionModel without it; both are read, and to-hf writes the transformers-5 names.
OPTIONAL_HF_PREFIX = "vision_model."


@dataclasses.dataclass(frozen=True)
class _SiglipRule(Rule):
    """A Rule whose HF name may carry the optional "vision_model." prefix when read."""

    @property
    def hf_regex(self) -> re.Pattern:
        return re.compile(r"(?:" + re.escape(OPTIONAL_HF_PREFIX) + r")?" + super().hf_regex.pattern)


# Per encoder block: (HF name under encoder.layers.{i}., Flax path under the block, kind, n_in).
_BLOCK_TABLE = (
    ("layer_norm1.weight", "layer_norm1/scale", "copy", 1),
    ("layer_norm1.bias", "layer_norm1/bias", "copy", 1),
    ("self_attn.q_proj.weight", "self_attn/q_proj/kernel", "linear", 1),
    ("self_attn.q_proj.bias", "self_attn/q_proj/bias", "flat", 1),
    ("self_attn.k_proj.weight", "self_attn/k_proj/kernel", "linear", 1),
    ("self_attn.k_proj.bias", "self_attn/k_proj/bias", "flat", 1),
    ("self_attn.v_proj.weight", "self_attn/v_proj/kernel", "linear", 1),
    ("self_attn.v_proj.bias", "self_attn/v_proj/bias", "flat", 1),
    ("self_attn.out_proj.weight", "self_attn/out_proj/kernel", "linear", 2),
    ("self_attn.out_proj.bias", "self_attn/out_proj/bias", "copy", 1),
    ("layer_norm2.weight", "layer_norm2/scale", "copy", 1),
    ("layer_norm2.bias", "layer_norm2/bias", "copy", 1),
    ("mlp.fc1.weight", "mlp/fc1/kernel", "linear", 1),
    ("mlp.fc1.bias", "mlp/fc1/bias", "copy", 1),
    ("mlp.fc2.weight", "mlp/fc2/kernel", "linear", 1),
    ("mlp.fc2.bias", "mlp/fc2/bias", "copy", 1),
)

_STEM_TABLE = (
    ("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", "conv", 1),
    ("embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias", "copy", 1),
    ("embeddings.position_embedding.weight", "embeddings/position_embedding", "copy", 1),
    ("post_layernorm.weight", "post_layernorm/scale", "copy", 1),
    ("post_layernorm.bias", "post_layernorm/bias", "copy", 1),
)

# The attention-pooling head; torch.nn.MultiheadAttention keeps q/k/v packed in one
# [3C, C] weight, which the Flax side keeps packed too: kernel [C, 3, heads, head_dim].
_HEAD_TABLE = (
    ("head.probe", "head/probe", "copy", 1),
    ("head.attention.in_proj_weight", "head/attention/in_proj_kernel", "linear", 1),
    ("head.attention.in_proj_bias", "head/attention/in_proj_bias", "flat", 1),
    ("head.attention.out_proj.weight", "head/attention/out_proj/kernel", "linear", 2),
    ("head.attention.out_proj.bias", "head/attention/out_proj/bias", "copy", 1),
    ("head.layernorm.weight", "head/layernorm/scale", "copy", 1),
    ("head.layernorm.bias", "head/layernorm/bias", "copy", 1),
    ("head.mlp.fc1.weight", "head/mlp/fc1/kernel", "linear", 1),
    ("head.mlp.fc1.bias", "head/mlp/fc1/bias", "copy", 1),
    ("head.mlp.fc2.weight", "head/mlp/fc2/kernel", "linear", 1),
    ("head.mlp.fc2.bias", "head/mlp/fc2/bias", "copy", 1),
)


def rules(config: siglip.SiglipConfig) -> list[Rule]:
    """The full table for ``config``: scanned blocks map {i} onto the stacked "layers" axis."""
    table = [_SiglipRule(hf=hf, flax=fx, kind=kind, n_in=n_in) for hf, fx, kind, n_in in _STEM_TABLE]
    for hf, fx, kind, n_in in _BLOCK_TABLE:
        if config.scan_layers:
            table.append(_SiglipRule(hf=f"encoder.layers.{{i}}.{hf}", flax=f"encoder/layers/{fx}",
                              kind=kind, n_in=n_in, stacked="i"))
        else:
            table.append(_SiglipRule(hf=f"encoder.layers.{{i}}.{hf}", flax=f"encoder/layers_{{i}}/{fx}",
                              kind=kind, n_in=n_in))
    if config.use_head:
        table += [_SiglipRule(hf=hf, flax=fx, kind=kind, n_in=n_in) for hf, fx, kind, n_in in _HEAD_TABLE]
    return table


SPEC = ModelSpec(
    name="siglip",
    config_from_hf=siglip.SiglipConfig.from_hf,
    config_to_hf=siglip.SiglipConfig.to_hf,
    config_from_dict=siglip.SiglipConfig.from_dict,
    rules=rules,
    param_shapes=siglip.param_shapes,
    # A full SiglipModel checkpoint: the text tower and the contrastive logit scale/bias.
    skip_prefixes=("text_model.", "logit_scale", "logit_bias"),
)
