"""SigLIP text tower <-> Hugging Face SiglipTextModel: the name table.

`python -m convert to-flax siglip_text HF_DIR OUT_DIR` reads a SiglipTextModel checkpoint
(transformers 5 names), or a full SiglipModel one (under "text_model."; its vision tower
and logit scale/bias are skipped with a notice); `to-hf siglip_text` writes a
SiglipTextModel. The encoder blocks are the vision tower's (convert/siglip.py's table).
"""
from __future__ import annotations

import dataclasses
import re

from convert.siglip import _BLOCK_TABLE
from convert.spec import ModelSpec, Rule
from metamorph_jax.models import siglip_text

# Where the text tower sits in a full SiglipModel checkpoint (and 4.x SiglipTextModel ones).
OPTIONAL_HF_PREFIX = "text_model."


@dataclasses.dataclass(frozen=True)
class _TextRule(Rule):
    """A Rule whose HF name may carry the optional "text_model." prefix when read."""

    @property
    def hf_regex(self) -> re.Pattern:
        return re.compile(r"(?:" + re.escape(OPTIONAL_HF_PREFIX) + r")?" + super().hf_regex.pattern)


_STEM_TABLE = (
    ("embeddings.token_embedding.weight", "embeddings/token_embedding/embedding", "copy", 1),
    ("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding", "copy", 1),
    ("final_layer_norm.weight", "final_layer_norm/scale", "copy", 1),
    ("final_layer_norm.bias", "final_layer_norm/bias", "copy", 1),
    ("head.weight", "head/kernel", "linear", 1),
    ("head.bias", "head/bias", "copy", 1),
)


def rules(config: siglip_text.SiglipTextConfig) -> list[Rule]:
    table = [_TextRule(hf=hf, flax=fx, kind=kind, n_in=n_in) for hf, fx, kind, n_in in _STEM_TABLE]
    for hf, fx, kind, n_in in _BLOCK_TABLE:
        if config.scan_layers:
            table.append(_TextRule(hf=f"encoder.layers.{{i}}.{hf}", flax=f"encoder/layers/{fx}",
                                   kind=kind, n_in=n_in, stacked="i"))
        else:
            table.append(_TextRule(hf=f"encoder.layers.{{i}}.{hf}",
                                   flax=f"encoder/layers_{{i}}/{fx}", kind=kind, n_in=n_in))
    return table


SPEC = ModelSpec(
    name="siglip_text",
    config_from_hf=siglip_text.SiglipTextConfig.from_hf,
    config_to_hf=siglip_text.SiglipTextConfig.to_hf,
    config_from_dict=siglip_text.SiglipTextConfig.from_dict,
    rules=rules,
    param_shapes=siglip_text.text_param_shapes,
    skip_prefixes=("vision_model.", "logit_scale", "logit_bias"),
)
