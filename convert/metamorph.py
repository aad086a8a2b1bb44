"""MetaMorph as the authors' code saves it <-> metamorph_jax.models.metamorph.

The authors' checkpoint (REFERENCE.md, "The authors' checkpoint layout") is a LLaMA folder:
config.json is a LlamaConfig with `model_type: "metamorph_llama"` and the mm_* fields, and
the tensors are LLaMA's plus `model.mm_projector.{0,2}.*`, `vision_head.{0,2}.*`, an unused
`model.vision_proj.*` (dropped with a notice) and, when saved, the SigLIP tower under
`model.vision_tower.vision_tower.`. The table is the LLaMA and SigLIP tables under
prefixes plus the four adapter / head linears.

    python -m convert to-flax metamorph SRC_DIR OUT_DIR [--vision-tower SIGLIP_DIR]
    python -m convert to-hf metamorph OUT_DIR DST_DIR

The authors' config.json does not describe the tower's architecture. It is read from
--vision-tower (a Hugging Face SigLIP folder, which also supplies the tower's weights
when the checkpoint has none), else from a `vision_config` field (which to-hf writes),
else, when `mm_vision_tower` names SigLIP So400m/14@384 (what the authors' code loads
whatever the name), So400m's own config.
"""
from __future__ import annotations

from pathlib import Path

from convert import llama as llama_convert
from convert import siglip as siglip_convert
from convert.core import ConversionError, open_checkpoint, read_json, tensors_to_flax
from convert.spec import ModelSpec, Rule, prefixed
from metamorph_jax import pretrained
from metamorph_jax.models import metamorph
from metamorph_jax.models.siglip import SiglipConfig

TOWER_PREFIX = "model.vision_tower.vision_tower."
# A Linear(4096, d) the authors' model creates and never uses.
UNUSED_PREFIXES = ("model.vision_proj.",)
def rules(cfg: metamorph.MetaMorphConfig) -> list[Rule]:
    table = prefixed(llama_convert.rules(cfg.llm), "", "llm/")
    table += prefixed(siglip_convert.rules(cfg.vision), TOWER_PREFIX, "vision_tower/")
    for hf, flax in (("model.mm_projector", "mm_projector"), ("vision_head", "vision_head")):
        for index in (0, 2):  # nn.Sequential(Linear, GELU, Linear)
            table += [Rule(f"{hf}.{index}.weight", f"{flax}/linear_{index}/kernel", "linear"),
                      Rule(f"{hf}.{index}.bias", f"{flax}/linear_{index}/bias")]
    return table


SPEC = ModelSpec(name="metamorph", config_from_hf=metamorph.MetaMorphConfig.from_hf,
                 config_to_hf=metamorph.MetaMorphConfig.to_hf,
                 config_from_dict=metamorph.MetaMorphConfig.from_dict, rules=rules,
                 param_shapes=metamorph.param_shapes, skip_prefixes=UNUSED_PREFIXES)


def _tower_loaders(tower_dir: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """A Hugging Face SigLIP folder's vision tensors, renamed as the authors' checkpoint
    holds them (a full SiglipModel's text tower is left out)."""
    loaders, origin = open_checkpoint(tower_dir, allow_pickle, "model")
    renamed, where, skipped = {}, {}, 0
    for name, load in loaders.items():
        if name.startswith(siglip_convert.SPEC.skip_prefixes):
            skipped += 1
            continue
        short = name.removeprefix(siglip_convert.OPTIONAL_HF_PREFIX)
        renamed[TOWER_PREFIX + short], where[TOWER_PREFIX + short] = load, origin[name]
    if skipped:
        print(f"note: skipped {skipped} tensors of {tower_dir} that are not the vision tower")
    return renamed, where


def checkpoint_to_flax(src_dir: str | Path, out_dir: str | Path,
                       vision_tower: str | Path | None = None, allow_pickle: bool = False,
                       variant: str | None = None, progress: bool = True) -> None:
    """The authors' MetaMorph folder (+ optionally a SigLIP folder) -> our model folder."""
    src_dir = Path(src_dir)
    hf_config = read_json(src_dir / "config.json")
    loaders, origin = open_checkpoint(src_dir, allow_pickle, SPEC.weights_name, variant)
    has_tower = any(name.startswith(TOWER_PREFIX) for name in loaders)
    if not has_tower and vision_tower is None:
        raise ConversionError(
            f"{src_dir}: the checkpoint holds no vision tower tensors ({TOWER_PREFIX}*); "
            f"pass --vision-tower SIGLIP_DIR (a Hugging Face SigLIP folder)")
    vision = None
    if vision_tower is not None:
        tower_config = Path(vision_tower) / "config.json"
        try:
            vision = SiglipConfig.from_hf(read_json(tower_config), source=str(tower_config))
        except ValueError as e:
            raise ConversionError(str(e)) from None
    try:
        config = metamorph.MetaMorphConfig.from_hf(hf_config, vision)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{src_dir / 'config.json'}: {e}") from None
    if not has_tower:
        tower, tower_origin = _tower_loaders(Path(vision_tower), allow_pickle)
        loaders.update(tower)
        origin.update(tower_origin)
    else:
        if vision_tower is not None:
            print(f"note: {src_dir} holds its own vision tower; {vision_tower} gives only its "
                  f"config")
    params = tensors_to_flax(SPEC, config, loaders, origin, progress, where=src_dir)
    # The authors trained MetaMorph with their LLaMA-3 template (one newline after each
    # header), whatever template the folder's tokenizer carries.
    pretrained.save_pretrained(out_dir, SPEC.name, config.to_dict(), params, hf_config,
                               chat_template="llama3")
