"""A converted or trained model on disk: `model_config.json` + an Orbax `params/` tree,
and the tokenizer files beside them.

`model_config.json` holds {"model": name, "config": our config as a dict,
"hf_config": the source config.json when there was one, "chat_template": the name of the
conversation template (data/conversation.py TEMPLATES) the model was trained with: the
one its training here rendered with, or for a converted chat model "tokenizer" (its
tokenizer's own template, which it was trained with elsewhere)}. The
parameters restore as host numpy arrays, or straight onto a mesh when shardings are given.
Training, evaluation and generation all read a folder through here, so they agree on the
template and the tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from metamorph_jax import config_io
from metamorph_jax.input_errors import BadInput

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
# The template of a folder that does not name one (converted before conversions recorded
# the tokenizer's, or from a tokenizer without one): the MetaMorph authors' variant of
# LLaMA-3's, which train.py uses by default.
DEFAULT_CHAT_TEMPLATE = "llama3"
# Files of a Hugging Face folder that carry its tokenizer's chat template.
_TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.json")


def save_pretrained(out_dir: str | Path, model: str, config: dict, params: Any,
                    hf_config: dict | None = None, chat_template: str | None = None) -> None:
    """Writes params (a nested dict of numpy or jax arrays) and the config to out_dir.

    In a multi-process run every process calls it with the same tree: jax.Arrays sharded
    over the processes are written shard by shard by their owners, numpy arrays by process
    0, which alone writes model_config.json."""
    import orbax.checkpoint as ocp
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PARAMS_DIR).exists():
        raise FileExistsError(f"{out_dir / PARAMS_DIR} already exists; choose an empty folder")
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params)
    # Orbax deep-copies host arrays before writing by default (so callers may mutate them
    # during an async save); this save is synchronous, and skipping the copy keeps peak
    # memory at one model, which is what lets an 8B bf16 model convert in 24 GB.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    # zstd compression would hold a compressed copy of every array in flight (weights
    # barely compress anyway), so it is off.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    ocp.Checkpointer(handler).save(out_dir / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
    saved = {"model": model, "config": config, "hf_config": hf_config}
    if chat_template is not None:
        saved["chat_template"] = chat_template
    if jax.process_index() == 0:
        config_io.write_json(out_dir / CONFIG_FILE, saved)


def read_model_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a converted model "
                                f"folder (python -m convert to-flax ... makes one)")
    data = config_io.read_json(path)
    for field in ("model", "config"):
        if field not in data:
            raise BadInput(f"{path}: missing field {field!r}")
    return data


def load_params(model_dir: str | Path, shardings: Any = None, dtype: Any = None) -> Any:
    """Restores the parameter tree.

    shardings: None for host numpy arrays, or a pytree of jax.sharding.Sharding matching
    the tree, to restore each array directly onto its devices. dtype: optional cast.
    """
    import orbax.checkpoint as ocp
    path = Path(model_dir).absolute() / PARAMS_DIR
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: no parameters in {model_dir}")
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    if shardings is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        params = ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        return params
    abstract = jax.tree.map(
        lambda meta, sharding: jax.ShapeDtypeStruct(meta.shape, dtype or meta.dtype,
                                                    sharding=sharding),
        metadata, shardings)
    return ocp.StandardCheckpointer().restore(path, abstract)


def chat_template(model_dir: str | Path) -> str:
    """The conversation template a model folder was trained with; DEFAULT_CHAT_TEMPLATE,
    with a warning naming the folder, when the folder does not say."""
    recorded = read_model_config(model_dir).get("chat_template")
    if recorded:
        return recorded
    import warnings
    warnings.warn(f"{Path(model_dir) / CONFIG_FILE} names no chat template (a folder converted "
                  f"before conversions recorded the tokenizer's, or from a tokenizer without "
                  f"one): prompting with {DEFAULT_CHAT_TEMPLATE!r}. A chat model trained with "
                  f"its tokenizer's template needs --template tokenizer (or convert it again)",
                  stacklevel=2)
    return DEFAULT_CHAT_TEMPLATE


def tokenizer_has_chat_template(folder: str | Path) -> bool:
    """Whether a Hugging Face folder's tokenizer carries a chat template (in
    chat_template.jinja, or the "chat_template" field of tokenizer_config.json or
    chat_template.json)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return True
    return any((folder / name).is_file() and bool(config_io.read_json(folder / name)
                                                  .get("chat_template"))
               for name in _TEMPLATE_FILES)


def load_tokenizer(tokenizer_dir: str | Path):
    """A transformers tokenizer from a local folder (never the hub)."""
    from transformers import AutoTokenizer
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def check_vocab(vocab_size: int, tokenizer, model_dir, tokenizer_dir) -> None:
    """A tokenizer with more ids than the model has rows is an error naming both."""
    if len(tokenizer) > vocab_size:
        raise BadInput(f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens but "
                       f"{Path(model_dir) / CONFIG_FILE} field 'config.vocab_size' is "
                       f"{vocab_size}; use the tokenizer the model was made with")


def load_llama(model_dir: str | Path, mesh=None, rules=None, *, dtype: str = "float32",
               remat_policy: str | None = None, scan_layers: bool | None = None):
    """(model, fp32 params, saved model_config) of a 'llama' model folder.

    mesh: None restores host-side arrays placed on the default device; a Mesh places each
    parameter by its logical axes (sharding.DEFAULT_RULES unless `rules`), and the model
    is built for the mesh's platform (LlamaConfig.platform). scan_layers:
    None keeps the folder's layer layout; True/False converts the params once here
    (llama.with_layer_layout turns them back for saving).
    """
    import jax.numpy as jnp

    from metamorph_jax import sharding
    from metamorph_jax.models.llama import (LlamaConfig, LlamaForCausalLM, abstract_boxed_params,
                                            with_layer_layout)

    saved = read_model_config(model_dir)
    if saved["model"] != "llama":
        raise BadInput(f"{Path(model_dir) / CONFIG_FILE}: field 'model' is "
                       f"{saved['model']!r}, expected 'llama'")
    changes = dict(dtype=dtype, param_dtype="float32",
                   platform=None if mesh is None else sharding.mesh_platform(mesh))
    if remat_policy is not None:
        changes["remat_policy"] = remat_policy
    stored = LlamaForCausalLM(LlamaConfig.from_dict(saved["config"]).replace(**changes))
    if mesh is None:
        params = jax.tree.map(jnp.asarray, load_params(model_dir, dtype=np.float32))
        shardings = None
    else:
        rules = sharding.DEFAULT_RULES if rules is None else rules
        shardings = sharding.logical_shardings(abstract_boxed_params(stored), mesh, rules)
        params = load_params(model_dir, shardings, dtype=jnp.float32)
    if scan_layers is None or bool(scan_layers) == stored.config.scan_layers:
        return stored, params, saved
    model = LlamaForCausalLM(stored.config.replace(scan_layers=bool(scan_layers)))
    if mesh is not None:
        shardings = sharding.logical_shardings(abstract_boxed_params(model), mesh, rules)
    params = jax.jit(lambda p: with_layer_layout(p, model.config.num_layers, bool(scan_layers)),
                     out_shardings=shardings)(params)
    return model, params, saved


def add_token_rows(src_dir: str | Path, out_dir: str | Path, count: int = 2) -> dict:
    """A LLaMA model folder with `count` new vocabulary rows, written to out_dir.

    For MetaMorph's `<image_start>` and `<image_end>` (count=2, the default): the new
    input-embedding and LM-head rows are the mean of the existing rows, as the authors'
    code initialises them (models/token_rows.py). vocab_size grows in the saved config and
    in the source config.json kept beside it. Returns the new config dict.
    """
    from metamorph_jax.models import token_rows
    from metamorph_jax.models.llama import LlamaConfig

    saved = read_model_config(src_dir)
    if saved["model"] != "llama":
        raise BadInput(f"{Path(src_dir) / CONFIG_FILE}: field 'model' is {saved['model']!r}; "
                       f"vocabulary rows are added to a 'llama' folder")
    config = LlamaConfig.from_dict(saved["config"])
    params = token_rows.grow_vocab(load_params(src_dir), count, config.tie_word_embeddings)
    config = config.replace(vocab_size=config.vocab_size + count)
    hf_config = saved.get("hf_config")
    if hf_config is not None and "vocab_size" in hf_config:
        hf_config = {**hf_config, "vocab_size": config.vocab_size}
    save_pretrained(out_dir, "llama", config.to_dict(), params, hf_config,
                    chat_template=saved.get("chat_template"))
    return config.to_dict()
