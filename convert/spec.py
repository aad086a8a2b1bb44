"""How a model's checkpoint maps between Hugging Face / diffusers and Flax: data, not code.

A `ModelSpec` is a table of `Rule`s plus config translators. The generic machinery in
convert/core.py applies any table in both directions.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

KINDS = ("copy", "flat", "linear", "conv", "drop")
_PLACEHOLDER = re.compile(r"\{([a-z])\}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One family of tensors.

    hf: tensor name on the PyTorch side; {i}, {j}, {k} stand for integers.
    flax: '/'-joined Flax parameter path with the same placeholders.
    kind: copy (same shape) | flat (1-D on the HF side, reshaped in Flax) | linear (torch [out, in] <->
      flax kernel = weight.T reshaped) | conv (torch OIHW <-> flax HWIO) | drop (an HF
      tensor that is accepted and ignored, e.g. a tied lm_head; flax is unused).
    n_in: for linear, how many leading axes of the flax kernel are input axes.
    stacked: a placeholder that indexes the leading axis of a scanned (nn.scan) flax
      parameter instead of appearing in the flax path.
    """
    hf: str
    flax: str
    kind: str = "copy"
    n_in: int = 1
    stacked: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rule {self.hf!r}: kind {self.kind!r} is not one of {KINDS}")
        hf_names = set(_PLACEHOLDER.findall(self.hf))
        flax_names = set(_PLACEHOLDER.findall(self.flax))
        if self.stacked is not None:
            if self.stacked not in hf_names or self.stacked in flax_names:
                raise ValueError(f"rule {self.hf!r}: stacked placeholder {{{self.stacked}}} must "
                                 f"be in the HF name and not in the Flax path")
            flax_names.add(self.stacked)
        if self.kind != "drop" and hf_names != flax_names:
            raise ValueError(f"rule {self.hf!r} -> {self.flax!r}: placeholders differ")

    @property
    def hf_regex(self) -> re.Pattern:
        return _template_regex(self.hf, r"\.")

    @property
    def flax_regex(self) -> re.Pattern:
        return _template_regex(self.flax, "/")


def _template_regex(template: str, _sep: str) -> re.Pattern:
    parts = _PLACEHOLDER.split(template)
    pattern = ""
    for index, part in enumerate(parts):
        pattern += re.escape(part) if index % 2 == 0 else f"(?P<{part}>\\d+)"
    return re.compile(pattern + r"\Z")


def to_flax(rule: Rule, array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    """Applies a rule's transform HF -> Flax; the result has flax_shape or is an error."""
    if rule.kind == "copy":
        out = array
    elif rule.kind == "flat":
        out = array.reshape(flax_shape) if array.size == int(np.prod(flax_shape)) else array
    elif rule.kind == "linear":
        out = array.T
        if out.size == int(np.prod(flax_shape)):
            out = out.reshape(flax_shape)
    elif rule.kind == "conv":
        out = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    else:
        raise ValueError(f"rule kind {rule.kind!r} has no Flax side")
    return out


def to_hf(rule: Rule, array: np.ndarray) -> np.ndarray:
    """Applies a rule's transform Flax -> HF."""
    if rule.kind == "copy":
        return array
    if rule.kind == "flat":
        return array.reshape(-1)
    if rule.kind == "linear":
        fan_in = int(np.prod(array.shape[:rule.n_in]))
        return array.reshape(fan_in, -1).T
    if rule.kind == "conv":
        return array.transpose(3, 2, 0, 1)
    raise ValueError(f"rule kind {rule.kind!r} has no HF side")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the converter needs to know about one model family.

    config_from_hf: config.json dict -> our config (raises ValueError naming a bad field).
    config_to_hf: our config -> config.json dict that transformers / diffusers load.
    config_from_dict: our saved config dict -> our config.
    rules: our config -> the full table.
    param_shapes: our config -> nested dict of objects with .shape (jax.eval_shape of init).
    skip_prefixes: HF tensors ignored with a printed notice (e.g. another tower).
    weights_name: file stem written by to-hf ("model" or "diffusion_pytorch_model").
    """
    name: str
    config_from_hf: Callable[[dict], Any]
    config_to_hf: Callable[[Any], dict]
    config_from_dict: Callable[[dict], Any]
    rules: Callable[[Any], Sequence[Rule]]
    param_shapes: Callable[[Any], Any]
    skip_prefixes: tuple[str, ...] = ()
    weights_name: str = "model"


def prefixed(rules: Sequence[Rule], hf_prefix: str, flax_prefix: str) -> list[Rule]:
    """A sub-model's table placed under prefixes in a composite model, e.g. a SigLIP tower at
    hf "model.vision_tower.vision_tower." and flax "vision_tower/". Plain Rules come out:
    a table's own name variants (such as SigLIP's optional "vision_model.") do not apply
    inside another model's checkpoint."""
    return [Rule(hf=hf_prefix + rule.hf, flax=flax_prefix + rule.flax, kind=rule.kind,
                 n_in=rule.n_in, stacked=rule.stacked) for rule in rules]
