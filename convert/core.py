"""Table-driven checkpoint conversion, PyTorch (safetensors) <-> Flax (Orbax), any model.

Tensors stream one at a time from memory-mapped files: the stored dtype is kept (a bf16
checkpoint is never upcast) and only the growing Flax tree is held in memory, so an 8B
bf16 model converts in about its own size.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from convert import safetensors_io
from convert.spec import ModelSpec, Rule, to_flax as rule_to_flax, to_hf as rule_to_hf
from metamorph_jax import config_io, pretrained
from metamorph_jax.input_errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "added_tokens.json",
                   "vocab.json", "merges.txt", "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


class ConversionError(InputError, ValueError):
    """A checkpoint that does not fit its model: the message names file and tensor."""


# --------------------------------------------------------------------------- reading

def _pickle_loaders(path: Path) -> dict[str, Callable[[], np.ndarray]]:
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a flat dict of tensors (a state_dict)")

    def load(tensor):
        if tensor.dtype == torch.bfloat16:
            import ml_dtypes
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    return {name: (lambda t=t: load(t)) for name, t in state.items()}


def _select_weight_files(src_dir: Path, weights_name: str | None, variant: str | None
                         ) -> tuple[list[Path], Path | None]:
    """(safetensors files, index file or None) to read from a folder.

    With weights_name ("model", "diffusion_pytorch_model") the files of that name (and
    variant, e.g. "fp16") win when present, so a Hub folder that holds an fp32 and an
    fp16 copy converts the one asked for; otherwise every *.safetensors is read.
    """
    if weights_name is not None:
        infix = f".{variant}" if variant else ""
        for index in (src_dir / f"{weights_name}{infix}.safetensors.index.json",
                      src_dir / f"{weights_name}.safetensors.index{infix}.json"):
            if index.exists():
                return [], index
        single = src_dir / f"{weights_name}{infix}.safetensors"
        if single.exists():
            return [single], None
        if variant:
            raise ConversionError(f"{src_dir}: no {single.name} and no index for variant "
                                  f"{variant!r}")
    indexes = sorted(src_dir.glob("*.safetensors.index*.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{src_dir}: several index files {[p.name for p in indexes]}; "
                              f"pass --variant to choose")
    return sorted(src_dir.glob("*.safetensors")), (indexes[0] if indexes else None)


def open_checkpoint(src_dir: str | Path, allow_pickle: bool = False,
                    weights_name: str | None = None, variant: str | None = None
                    ) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, Path]]:
    """Finds the weights in a folder: sharded (index) or single safetensors files, or,
    only with allow_pickle, PyTorch pickles. Returns (name -> loader, name -> file)."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise ConversionError(f"{src_dir} is not a folder")
    files, index = _select_weight_files(src_dir, weights_name, variant)
    weight_map = None
    if index is not None:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: missing field 'weight_map'")
        for file in sorted(set(weight_map.values())):
            if not (src_dir / file).exists():
                raise ConversionError(f"{index}: lists {file}, which does not exist")
        files = [src_dir / file for file in sorted(set(weight_map.values()))]
    if not files:
        pickles = sorted(p for p in src_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise ConversionError(f"{src_dir}: no weights found (looked for *.safetensors, "
                                  f"*.safetensors.index.json and pickles {PICKLE_SUFFIXES})")
        if not allow_pickle:
            raise ConversionError(
                f"{pickles[0]}: is a pickle file, which can run code when loaded. Convert it "
                f"to safetensors, or pass --allow-pickle to load it with "
                f"torch.load(weights_only=True).")
        files = pickles

    loaders, origin = {}, {}
    for path in files:
        try:
            opened = (safetensors_io.open_tensors(path) if path.suffix == ".safetensors"
                      else _pickle_loaders(path))
        except safetensors_io.SafetensorsError as e:  # the message already names the file
            raise ConversionError(str(e)) from None
        for name, load in opened.items():
            if name in loaders:
                raise ConversionError(f"{path}: tensor {name!r} also stored in {origin[name]}")
            loaders[name], origin[name] = load, path
    for name, file in (weight_map or {}).items():
        if name not in loaders or origin[name].name != file:
            raise ConversionError(f"{index}: tensor {name!r} is not in {file}")
    return loaders, origin


def read_json(path: Path) -> dict:
    """config_io.read_json, with a missing or broken file as a ConversionError."""
    try:
        return config_io.read_json(path)
    except (FileNotFoundError, config_io.ConfigFileError) as error:
        raise ConversionError(str(error)) from None


# --------------------------------------------------------------------------- matching

def _match(rules, name: str, attr: str) -> tuple[Rule, dict] | None:
    for rule in rules:
        found = getattr(rule, attr).match(name)
        if found:
            return rule, found.groupdict()
    return None


def _hf_names_for(rules, path: str, length: int | None) -> list[str]:
    """The HF names that would have filled a Flax parameter (for error messages)."""
    hit = _match(rules, path, "flax_regex")
    if hit is None:
        return [f"(no rule produces {path})"]
    rule, groups = hit
    if rule.stacked:
        return [rule.hf.format(**groups, **{rule.stacked: i}) for i in range(length or 0)]
    return [rule.hf.format(**groups)]


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


# --------------------------------------------------------------------------- to Flax

def hf_to_flax(spec: ModelSpec, src_dir: str | Path, out_dir: str | Path,
               allow_pickle: bool = False, progress: bool = True,
               variant: str | None = None) -> None:
    """Converts a Hugging Face / diffusers folder into an Orbax model folder."""
    src_dir = Path(src_dir)
    hf_config = read_json(src_dir / "config.json")
    try:
        config = spec.config_from_hf(hf_config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{src_dir / 'config.json'}: {e}") from None
    loaders, origin = open_checkpoint(src_dir, allow_pickle, spec.weights_name, variant)
    params = tensors_to_flax(spec, config, loaders, origin, progress, where=src_dir)
    # A chat model was trained with its tokenizer's template: the folder says so, and
    # generation and evaluation prompt with it (pretrained.chat_template).
    template = ("tokenizer" if spec.name == "llama" and pretrained.tokenizer_has_chat_template(
        src_dir) else None)
    pretrained.save_pretrained(out_dir, spec.name, _config_dict(config), params, hf_config,
                               chat_template=template)


def state_dict_to_flax(spec: ModelSpec, config, state: dict) -> dict:
    """In-memory conversion of a PyTorch state dict (tensors or numpy arrays)."""
    def as_numpy(value):
        return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    loaders = {name: (lambda v=v: as_numpy(v)) for name, v in state.items()}
    return tensors_to_flax(spec, config, loaders, {n: "state_dict" for n in state}, False,
                           where="state_dict")


def tensors_to_flax(spec: ModelSpec, config, loaders: dict[str, Callable[[], np.ndarray]],
                    origin: dict, progress: bool, where) -> dict:
    """Maps every named tensor through the spec's table into a nested Flax param dict."""
    shapes = {"/".join(k): tuple(v.shape) for k, v in
              traverse_util.flatten_dict(spec.param_shapes(config)).items()}
    rules = spec.rules(config)
    flat: dict[str, np.ndarray] = {}
    filled: dict[str, set[int]] = {}
    skipped = []
    for name in tqdm(sorted(loaders, key=_natural_key), desc=f"{spec.name} -> flax",
                     disable=not progress, unit="tensor"):
        if name.startswith(spec.skip_prefixes):
            skipped.append(name)
            continue
        hit = _match(rules, name, "hf_regex")
        if hit is None:
            raise ConversionError(f"{origin[name]}: unexpected tensor {name!r}: no {spec.name} "
                                  f"parameter corresponds to it")
        rule, groups = hit
        if rule.kind == "drop":
            continue
        stacked_index = int(groups.pop(rule.stacked)) if rule.stacked else None
        path = rule.flax.format(**groups)
        if path not in shapes:
            raise ConversionError(f"{origin[name]}: tensor {name!r} maps to Flax parameter "
                                  f"{path!r}, which this config does not have")
        full = shapes[path]
        target = full[1:] if rule.stacked else full
        source = loaders[name]()
        array = rule_to_flax(rule, source, target)
        if tuple(array.shape) != tuple(target):
            raise ConversionError(
                f"{origin[name]}: tensor {name!r} has shape {tuple(source.shape)}, which does "
                f"not fit Flax parameter {path!r} of shape {target} for this config")
        if rule.stacked is None:
            if path in flat:
                raise ConversionError(f"{origin[name]}: tensor {name!r} fills {path!r} twice")
            flat[path] = np.ascontiguousarray(array)
            continue
        if stacked_index >= full[0]:
            raise ConversionError(f"{origin[name]}: tensor {name!r}: index {stacked_index} is "
                                  f"past the config's {full[0]} layers")
        if path not in flat:
            flat[path] = np.empty(full, array.dtype)
            filled[path] = set()
        if flat[path].dtype != array.dtype:
            raise ConversionError(f"{origin[name]}: tensor {name!r} is {array.dtype}, other "
                                  f"layers of {path!r} are {flat[path].dtype}")
        if stacked_index in filled[path]:
            raise ConversionError(f"{origin[name]}: tensor {name!r} fills {path!r} twice")
        flat[path][stacked_index] = array
        filled[path].add(stacked_index)

    missing = []
    for path, shape in shapes.items():
        if path not in flat:
            missing += _hf_names_for(rules, path, shape[0] if shape else 0)
        elif path in filled and len(filled[path]) != shape[0]:
            missing += [n for i, n in enumerate(_hf_names_for(rules, path, shape[0]))
                        if i not in filled[path]]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8])
        raise ConversionError(f"{where}: {len(missing)} tensor(s) missing: {shown}"
                              + (" ..." if len(missing) > 8 else ""))
    if skipped:
        prefixes = sorted({p for p in spec.skip_prefixes if any(n.startswith(p) for n in skipped)})
        print(f"note: skipped {len(skipped)} tensors under {prefixes} (not part of {spec.name})")
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


# --------------------------------------------------------------------------- to HF

def flax_to_hf(spec: ModelSpec, model_dir: str | Path, hf_dir: str | Path,
               tokenizer_dir: str | Path | None = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> None:
    """Writes config.json and (sharded) safetensors that transformers / diffusers load."""
    model_dir, hf_dir = Path(model_dir), Path(hf_dir)
    saved = pretrained.read_model_config(model_dir)
    if saved["model"] != spec.name:
        raise ConversionError(f"{model_dir / pretrained.CONFIG_FILE}: field 'model' is "
                              f"{saved['model']!r}, not {spec.name!r}")
    config = spec.config_from_dict(saved["config"])
    params = pretrained.load_params(model_dir)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    expected = {"/".join(k): tuple(v.shape) for k, v in
                traverse_util.flatten_dict(spec.param_shapes(config)).items()}
    for path in sorted(set(expected) | set(flat)):
        if path not in flat or path not in expected or tuple(flat[path].shape) != expected[path]:
            raise ConversionError(
                f"{model_dir / pretrained.PARAMS_DIR}: parameter {path!r} is "
                f"{tuple(flat[path].shape) if path in flat else 'missing'}; the config expects "
                f"{expected.get(path, 'no such parameter')}")

    rules = [r for r in spec.rules(config) if r.kind != "drop"]
    entries: dict[str, np.ndarray] = {}
    for path, array in flat.items():
        hit = _match(rules, path, "flax_regex")
        if hit is None:
            raise ConversionError(f"Flax parameter {path!r} has no rule in the {spec.name} table")
        rule, groups = hit
        if rule.stacked:
            names = [(rule.hf.format(**groups, **{rule.stacked: i}), array[i])
                     for i in range(array.shape[0])]
        else:
            names = [(rule.hf.format(**groups), array)]
        for hf_name, part in names:
            if hf_name in entries:
                raise ConversionError(f"two Flax parameters write HF tensor {hf_name!r}")
            entries[hf_name] = rule_to_hf(rule, part)

    hf_dir.mkdir(parents=True, exist_ok=True)
    _write_shards(entries, hf_dir, spec.weights_name, max_shard_bytes, progress, spec.name)
    written = spec.config_to_hf(config)
    source = dict(saved.get("hf_config") or {})
    # Keep the source's extra fields (e.g. torch_dtype) only when it described this same
    # model: a full SiglipModel's text_config must not leak into a vision-only config.
    same_model = all(source.get(k) == written[k] for k in ("model_type", "_class_name")
                     if k in written)
    hf_config = {**source, **written} if same_model else written
    with open(hf_dir / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, hf_dir)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _write_shards(entries: dict[str, np.ndarray], hf_dir: Path, stem: str,
                  max_shard_bytes: int, progress: bool, label: str) -> None:
    shards, current, size = [], [], 0
    for name in sorted(entries, key=_natural_key):
        nbytes = entries[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    bar = tqdm(total=len(entries), desc=f"flax -> {label}", disable=not progress, unit="tensor")
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = (f"{stem}.safetensors" if len(shards) == 1
                else f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors")
        safetensors_io.write_file(
            hf_dir / file,
            [(n, entries[n].shape, entries[n].dtype, lambda n=n: entries[n]) for n in names],
            on_tensor=lambda _: bar.update())
        weight_map.update({n: file for n in names})
    bar.close()
    if len(shards) > 1:
        total = sum(a.nbytes for a in entries.values())
        with open(hf_dir / f"{stem}.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def copy_tokenizer(tokenizer_dir: str | Path, hf_dir: Path) -> None:
    tokenizer_dir = Path(tokenizer_dir)
    found = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).exists()]
    if not found:
        raise ConversionError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for name in found:
        shutil.copy2(tokenizer_dir / name, hf_dir / name)
