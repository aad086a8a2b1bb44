"""Finding and loading what generation needs: a "metamorph" model folder and a
"visualizer" folder, given either folder or a training work directory.

A work directory (training/runner.py) holds `config.json` with the stage `order` and one
`<stage>/final/` model folder per finished stage, whose `DONE` file is written last. The
latest finished export of each kind is the one generation uses.
"""
from __future__ import annotations

from pathlib import Path

from metamorph_jax import config_io, pretrained
from metamorph_jax.input_errors import BadInput

WORK_CONFIG = "config.json"
DONE_FILE = "DONE"
METAMORPH, VISUALIZER = "metamorph", "visualizer"


def is_model_folder(path: Path) -> bool:
    return (Path(path) / pretrained.CONFIG_FILE).is_file()


def model_kind(path: Path) -> str:
    return pretrained.read_model_config(path)["model"]


def stage_exports(work_dir: str | Path) -> dict[str, Path]:
    """{kind: final/ folder of the latest finished stage exporting that kind}."""
    work_dir = Path(work_dir)
    config_path = work_dir / WORK_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{work_dir} is neither a model folder ({pretrained.CONFIG_FILE}) "
                                f"nor a training work directory ({WORK_CONFIG})")
    order = config_io.read_json(config_path).get("order")
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise BadInput(f"{config_path}: field 'order' must be a list of stage names")
    found: dict[str, Path] = {}
    for name in order:
        final = work_dir / name / "final"
        if (final / DONE_FILE).is_file():
            found[model_kind(final)] = final   # a later stage replaces an earlier one
    return found


def _sibling_visualizer(model_dir: Path) -> Path | None:
    """A visualizer folder beside `model_dir`, or the work directory's latest, when
    model_dir is a stage export (<work>/<stage>/final)."""
    candidates = [p for p in sorted(model_dir.parent.iterdir())
                  if p != model_dir and p.is_dir() and is_model_folder(p)
                  and model_kind(p) == VISUALIZER]
    if len(candidates) > 1:
        raise BadInput(f"several visualizer folders beside {model_dir}: "
                       f"{[str(p) for p in candidates]}; choose one with --visualizer")
    if candidates:
        return candidates[0]
    work_dir = model_dir.parent.parent
    if model_dir.name == "final" and (work_dir / WORK_CONFIG).is_file():
        return stage_exports(work_dir).get(VISUALIZER)
    return None


def resolve(checkpoint: str | Path, visualizer: str | Path | None = None
            ) -> tuple[Path, Path | None]:
    """(metamorph folder, visualizer folder or None when there is none) for --checkpoint
    (a model folder or a work directory) and an optional --visualizer folder."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint} is not a folder")
    if is_model_folder(checkpoint):
        kind = model_kind(checkpoint)
        if kind != METAMORPH:
            raise BadInput(f"{checkpoint / pretrained.CONFIG_FILE}: field 'model' is {kind!r}, "
                           f"expected {METAMORPH!r}")
        model_dir = checkpoint
        found_visualizer = None if visualizer else _sibling_visualizer(checkpoint)
    else:
        exports = stage_exports(checkpoint)
        if METAMORPH not in exports:
            raise FileNotFoundError(f"{checkpoint}: no finished stage exported a {METAMORPH!r} "
                                    f"model (stages with {DONE_FILE}: {sorted(exports.values())})")
        model_dir = exports[METAMORPH]
        found_visualizer = exports.get(VISUALIZER)
    if visualizer:
        visualizer = Path(visualizer)
        kind = model_kind(visualizer)
        if kind != VISUALIZER:
            raise BadInput(f"{visualizer / pretrained.CONFIG_FILE}: field 'model' is {kind!r}, "
                           f"expected {VISUALIZER!r}")
        return model_dir, visualizer
    return model_dir, found_visualizer


def load_metamorph(model_dir: str | Path, dtype: str = "float32"):
    """(MetaMorph model, params, saved model_config) of a "metamorph" folder; `dtype` is
    the compute dtype (params stay fp32)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from metamorph_jax.models.metamorph import MetaMorph, MetaMorphConfig

    saved = pretrained.read_model_config(model_dir)
    if saved["model"] != METAMORPH:
        raise BadInput(f"{Path(model_dir) / pretrained.CONFIG_FILE}: field 'model' is "
                       f"{saved['model']!r}, expected {METAMORPH!r}")
    config = MetaMorphConfig.from_dict(saved["config"])
    config = config.replace(llm=config.llm.replace(dtype=dtype, remat_policy="none"),
                            vision=config.vision.replace(dtype=dtype))
    params = jax.tree.map(jnp.asarray, pretrained.load_params(model_dir, dtype=np.float32))
    return MetaMorph(config), params, saved


def load_visualizer(visualizer_dir: str | Path):
    """(Visualizer model, params, NoiseSchedule) of a "visualizer" folder, whose config is
    {"model": VisualizerConfig fields, "noise": NoiseSchedule fields, ...}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from metamorph_jax.models.noise_schedule import NoiseSchedule
    from metamorph_jax.models.visualizer import Visualizer, VisualizerConfig

    path = Path(visualizer_dir) / pretrained.CONFIG_FILE
    saved = pretrained.read_model_config(visualizer_dir)
    if saved["model"] != VISUALIZER:
        raise BadInput(f"{path}: field 'model' is {saved['model']!r}, expected {VISUALIZER!r}")
    for field in ("model", "noise"):
        if not isinstance(saved["config"].get(field), dict):
            raise BadInput(f"{path}: field 'config.{field}' is missing or not an object")
    try:
        config = VisualizerConfig.from_dict(saved["config"]["model"])
        schedule = NoiseSchedule(**saved["config"]["noise"])
    except (TypeError, ValueError) as error:
        raise BadInput(f"{path}: {error}") from None
    params = jax.tree.map(jnp.asarray, pretrained.load_params(visualizer_dir, dtype=np.float32))
    return Visualizer(config), params, schedule


def load_metamorph_for_decoding(model_dir: str | Path, dtype: str = "float32"):
    """(model, params, tokenizer, end token ids) of a "metamorph" folder, with the folder's
    tokenizer checked against the model: its size, and the ids of the two image markers."""
    from metamorph_jax.data import conversation as conv

    model, params, _ = load_metamorph(model_dir, dtype=dtype)
    tokenizer = pretrained.load_tokenizer(model_dir)
    pretrained.check_vocab(model.config.llm.vocab_size, tokenizer, model_dir, model_dir)
    vocab = tokenizer.get_vocab()
    for name, expected in ((conv.IMAGE_START, model.config.image_start_id),
                           (conv.IMAGE_END, model.config.image_end_id)):
        if vocab.get(name) != expected:
            raise BadInput(f"{model_dir}: the tokenizer has {name} = {vocab.get(name)}, the "
                           f"model config's id is {expected}")
    ends = {int(t) for t in model.config.llm.eos_token_ids}
    if tokenizer.eos_token_id is not None:
        ends.add(int(tokenizer.eos_token_id))
    return model, params, tokenizer, sorted(ends)
