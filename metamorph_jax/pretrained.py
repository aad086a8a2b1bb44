"""A converted or trained model on disk: `model_config.json` + an Orbax `params/` tree.

`model_config.json` holds {"model": name, "config": our config as a dict,
"hf_config": the source config.json when there was one}. The parameters restore as
host numpy arrays, or straight onto a mesh when shardings are given.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_pretrained(out_dir: str | Path, model: str, config: dict, params: Any,
                    hf_config: dict | None = None) -> None:
    """Writes params (a nested dict of numpy or jax arrays) and the config to out_dir."""
    import orbax.checkpoint as ocp
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PARAMS_DIR).exists():
        raise FileExistsError(f"{out_dir / PARAMS_DIR} already exists; choose an empty folder")
    params = jax.tree.map(np.asarray, params)
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
    with open(out_dir / CONFIG_FILE, "w") as f:
        json.dump({"model": model, "config": config, "hf_config": hf_config}, f, indent=2)


def read_model_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a converted model "
                                f"folder (python -m convert to-flax ... makes one)")
    with open(path) as f:
        data = json.load(f)
    for field in ("model", "config"):
        if field not in data:
            raise ValueError(f"{path}: missing field {field!r}")
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
