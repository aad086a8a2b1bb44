"""Checkpoint converters, PyTorch <-> Flax. Command line: `python -m convert --help`.

Each model family is a table (a ModelSpec in convert/<name>.py); composites convert
several sub-folders at once (sd15 = unet/ + vae/).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from metamorph_jax.input_errors import BadInput

if TYPE_CHECKING:   # convert.spec imports JAX; `python -m convert` decides the platform first
    from convert.spec import ModelSpec

SPEC_MODULES = {"llama": "convert.llama", "siglip": "convert.siglip",
                "siglip_text": "convert.siglip_text",
                "unet": "convert.unet", "vae": "convert.vae", "metamorph": "convert.metamorph"}
COMPOSITES = {"sd15": ("unet", "vae")}


def get_spec(name: str) -> ModelSpec:
    if name not in SPEC_MODULES:
        raise BadInput(f"unknown model {name!r}; known: {sorted(SPEC_MODULES) + sorted(COMPOSITES)}")
    return importlib.import_module(SPEC_MODULES[name]).SPEC
