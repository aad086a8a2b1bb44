"""The frozen SigLIP tower's visual tokens of every image of some record files, computed once
into a token store (data/token_store.py), so training can read tokens instead of pixels.
`python -m metamorph_jax.data.encode` is its command line.

Work split. Every process lists the images of all inputs (the same keys in the same sorted
order), takes keys p, p + P, p + 2P, ... (process p of P), drops those already in the
store's committed parts, and encodes the rest in batches of `batch_size` x its local
devices, each batch split over a mesh of this process's devices (so processes never wait
for each other while encoding). Every process writes its own parts; when all are done
(a barrier when P > 1), process 0 writes the index that lists every process's parts: the
outputs combine by reference, nothing is copied. Images are decoded and preprocessed on
`read_threads` threads while the devices run the previous batch; preprocessing is the
pipeline's (images.load_image at the tower's image size), so stored tokens equal the
tokens the tower computes from the pipeline's pixels, up to the stored dtype.

Resuming: a rerun with the same settings encodes only what no committed part holds (a part
is committed every `part_size` images, so a stop loses at most one part per process); a
store without index.json is refused by the reader, so a half-written store never looks
complete.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from metamorph_jax import pretrained
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import token_store
from metamorph_jax.data.sources import open_source
from metamorph_jax.input_errors import InputError


class EncodeError(InputError, ValueError):
    """Input the encoder cannot use (the message names the file, the record and the field)."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
    key: str
    path: str
    where: str      # the first record that refers to it ("file:line")
    field: str


def list_images(inputs: Sequence[str], image_root: str | None = None,
                progress: bool = True) -> list[ImageRef]:
    """Every image file the records of `inputs` refer to, once, sorted by key. A record
    that cannot be parsed is an error naming it (its images would be unknown); so is a key
    that names two files (token_store's docstring: a symlink followed by "..")."""
    from tqdm import tqdm
    found: dict[str, ImageRef] = {}
    for path in inputs:
        source = open_source(path, image_root)
        for index in tqdm(range(len(source)), desc=f"listing {Path(path).name}",
                          disable=not progress, unit="records"):
            element = source[index]
            where = element["where"]
            try:
                record = conv.parse_record(element["raw"], where=where,
                                           image_root=element["image_root"])
                refs = token_store.record_keys(record.image_paths, element["raw"], where)
            except (conv.RecordError, token_store.TokenStoreError) as error:
                raise EncodeError(f"cannot list the images of a record: {error}") from None
            for key, image_path, field in refs:
                first = found.setdefault(key, ImageRef(key, image_path, where, field))
                # Paths spelled differently: compare the files they reach.
                if first.path != image_path and \
                        os.path.realpath(first.path) != os.path.realpath(image_path):
                    raise EncodeError(
                        f"{where}: field {field!r} ({image_path}) and {first.where}: field "
                        f"{first.field!r} ({first.path}) are two files with one store key "
                        f"{key!r} (a symlinked folder followed by '..'); give the images "
                        "paths without '..' through links")
    return [found[key] for key in sorted(found)]


def load_tower(checkpoint: str | Path, compute_dtype: str = "float32"):
    """(SiglipVisionModel, host params) of a 'siglip' model folder."""
    from metamorph_jax.models.siglip import SiglipConfig, SiglipVisionModel
    saved = pretrained.read_model_config(checkpoint)
    if saved["model"] != "siglip":
        raise EncodeError(f"{Path(checkpoint) / pretrained.CONFIG_FILE}: field 'model' is "
                          f"{saved['model']!r}, expected 'siglip'")
    config = SiglipConfig.from_dict(saved["config"]).replace(dtype=compute_dtype,
                                                             param_dtype="float32")
    return SiglipVisionModel(config), pretrained.load_params(checkpoint, dtype=np.float32)


def store_settings(tower, checkpoint, dtype: str) -> dict:
    config = tower.config
    tower_config = token_store.tower_fields(config.to_dict())
    return {"format": token_store.FORMAT, "version": token_store.VERSION, "dtype": dtype,
            "shape": [config.num_visual_tokens, config.hidden_size],
            "image_size": config.image_size, "tower": tower_config,
            "tower_dir": str(Path(checkpoint).absolute())}


def _load(ref: ImageRef, size: int) -> np.ndarray:
    try:
        return images_lib.load_image(ref.path, size, "float32")
    except images_lib.ImageError as error:
        raise EncodeError(f"{ref.where}: field {ref.field!r}: {error}") from None


def encode(checkpoint: str | Path, inputs: Sequence[str], output: str | Path, *,
           image_root: str | None = None, dtype: str = "bfloat16", batch_size: int = 8,
           part_size: int = 4096, read_threads: int = 8, compute_dtype: str = "float32",
           image_size: int | None = None, num_image_tokens: int | None = None,
           progress: bool = True) -> dict:
    """Encode the images of `inputs` into the store `output` (see the module docstring).
    `batch_size` is per device. image_size / num_image_tokens, when given (the data
    config's), must be the tower's. Returns {"encoded", "already", "images", "index"}."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from tqdm import tqdm

    token_store.numpy_dtype(dtype)
    tower, params = load_tower(checkpoint, compute_dtype)
    config = tower.config
    where = Path(checkpoint) / pretrained.CONFIG_FILE
    for field, want, have in (("image_size", image_size, config.image_size),
                              ("num_visual_tokens", num_image_tokens, config.num_visual_tokens)):
        if want is not None and int(want) != have:
            raise EncodeError(f"{where}: field 'config.{field}' is {have}, the data's is {want}; "
                              "encode with the tower the model uses")
    store = token_store.prepare(output, store_settings(tower, checkpoint, dtype))
    process, processes = jax.process_index(), jax.process_count()
    token_store.remove_cut_parts(store, process)

    images = list_images(inputs, image_root, progress and process == 0)
    done = set()
    for _, keys in token_store.committed_parts(store):
        done.update(keys)
    mine = images[process::processes]
    todo = [ref for ref in mine if ref.key not in done]

    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    rows = batch_size * len(devices)
    split = NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    run = jax.jit(lambda p, x: tower.apply({"params": p}, x, method=tower.visual_tokens),
                  out_shardings=split)
    size = config.image_size
    writer = token_store.PartWriter(store, process, dtype,
                                    (config.num_visual_tokens, config.hidden_size), part_size)

    def read(batch: list[ImageRef]):
        pixels = np.zeros((rows, size, size, 3), np.float32)  # padded rows are dropped
        for row, array in enumerate(pool.map(lambda ref: _load(ref, size), batch)):
            pixels[row] = array
        return pixels

    batches = [todo[i:i + rows] for i in range(0, len(todo), rows)]
    # `pool` decodes images; `reader` assembles the next batch from them (two pools: a
    # task waiting on its own pool could starve it).
    with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool, \
            concurrent.futures.ThreadPoolExecutor(1) as reader, \
            tqdm(total=len(todo), desc=f"encoding (process {process})", unit="images",
                 disable=not progress) as bar:
        ahead = reader.submit(read, batches[0]) if batches else None
        for number, batch in enumerate(batches):
            pixels = ahead.result()
            # The next batch is read while the devices run this one.
            ahead = reader.submit(read, batches[number + 1]) if number + 1 < len(batches) else None
            tokens = np.asarray(jax.device_get(run(params, jax.device_put(pixels, split))))
            for row, ref in enumerate(batch):
                writer.add(ref.key, tokens[row])
            bar.update(len(batch))
    writer.close()

    if processes > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("metamorph_jax encode: every part committed")
    index = None
    if process == 0:
        index = token_store.finalize(store, [ref.key for ref in images])
    return {"encoded": len(todo), "already": len(mine) - len(todo), "images": len(images),
            "index": index}
