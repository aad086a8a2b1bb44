"""Checking Hugging Face / diffusers config dicts against what a model implements."""
from __future__ import annotations

from typing import Sequence

from metamorph_jax.input_errors import BadInput


def check_fields(raw: dict, source: str, known: Sequence[str], fixed: dict, ignored=()) -> None:
    """Raise ValueError naming the file and field for unknown or unsupported config values."""
    for key, value in raw.items():
        if key.startswith("_") or key in known or key in ignored:
            continue
        if key not in fixed:
            raise BadInput(f"{source}: unsupported config field {key!r}={value!r}")
        want = fixed[key]
        same = value == want or (isinstance(value, (list, tuple)) and all(v == want for v in value))
        if not same:
            raise BadInput(f"{source}: field {key!r}={value!r} is not supported (only {want!r})")
