"""Batches of real images for the decoder stage: each record's first image, in [-1, 1].

The decoder learns to draw an image from the frozen SigLIP tower's tokens of that same
image, so it needs only the pictures: any LLaVA-format record file with images will do
(the Shapes world's image_qa.jsonl, an image-caption set). Records pass through the same
shuffle / mixture / process shard as the VPiT pipeline (pipeline.record_dataset), so
`num_epochs`, `seed` and the sharding rules are the same; the iterator's
get_state/set_state make it resumable.

Each image is read twice from the file, as the authors' visualiser does: the decoder's
target at `image_size`, short side resized and centre-cropped (images.load_image_crop), and
the tower's input at the tower's size, SigLIP's own preprocessing of the original image
(images.load_image, the square resize the VPiT pipeline and the token store use). So the
condition is the same whether the stage runs the tower or reads stored tokens.

A batch: {"images": float32 [B, S, S, 3] in [-1, 1] (S = image_size; the normalisation is
SigLIP's, which is also the decoder's pixel range), "record_ids": object [B] (host only:
"id (file:line)")} and either "tower_images": float32 [B, R, R, 3] (R = the tower's
image size), or, with DataConfig.visual_tokens (a token store), "tokens" [B, V, C]: the
stored tokens of those images, which condition the decoder in place of running the tower
(an image without stored tokens is an error naming it).
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import pipeline
from metamorph_jax.data import token_store
from metamorph_jax.input_errors import InputError


class NoImageError(InputError, ValueError):
    """A record the decoder stage cannot use (it has no image, or the image is unreadable)."""


class FirstImage:
    """Record element -> {"image", "record_id"}; pickles (runs in grain workers)."""

    def __init__(self, image_size: int, tower_image_size: int, visual_tokens: str | None = None):
        self.image_size = image_size
        self.tower_image_size = tower_image_size
        self.visual_tokens = visual_tokens
        self._store = None   # opened on first use, in the process that reads

    def __getstate__(self):
        return dict(self.__dict__, _store=None)

    def stored_tokens(self, element: dict, record) -> np.ndarray:
        if self._store is None:
            self._store = token_store.TokenStore(self.visual_tokens)
        where = element["where"]
        key, path, field = token_store.record_keys(record.image_paths[:1], element["raw"],
                                                   where)[0]
        if key not in self._store:
            raise token_store.TokenStoreError(
                f"{where}: field {field!r}: image {key!r} ({path}) has no tokens in "
                f"{self._store.path}; encode this record file into the store "
                "(python -m metamorph_jax.data.encode)")
        return self._store[key]

    def __call__(self, element: dict) -> dict:
        where = element["where"]
        try:
            record = conv.parse_record(element["raw"], where=where,
                                       image_root=element["image_root"])
        except conv.RecordError as error:
            raise NoImageError(f"{where}: the decoder stage cannot read this record: "
                               f"{error}") from None
        if not record.image_paths:
            raise NoImageError(f"{where}: the record has no image; the decoder stage trains on "
                               "records with images")
        first = record.image_paths[0]
        try:
            if isinstance(first, np.ndarray):
                from PIL import Image
                image = Image.fromarray(first)
            else:
                image = images_lib.open_image(first)
        except images_lib.ImageError as error:
            raise NoImageError(f"{where}: {error}") from None
        record_id = f"{record.id} ({where})" if record.id != where else where
        out = {"image": images_lib.preprocess_crop(image, self.image_size),
               "record_id": record_id}
        if self.visual_tokens:
            out["tokens"] = self.stored_tokens(element, record)
        else:
            out["tower_image"] = images_lib.preprocess(image, self.tower_image_size)
        return out


def _stack(elements: Sequence[dict]) -> dict:
    ids = np.empty(len(elements), object)
    ids[:] = [element["record_id"] for element in elements]
    batch = {"images": np.stack([element["image"] for element in elements]), "record_ids": ids}
    for key, name in (("tokens", "tokens"), ("tower_image", "tower_images")):
        if key in elements[0]:
            batch[name] = np.stack([element[key] for element in elements])
    return batch


def image_batches(sources: Sequence[pipeline.Source], config: pipeline.DataConfig,
                  tower_image_size: int):
    """A resumable iterator of image batches (see the module docstring); `batch_size` rows
    per process, the last incomplete batch dropped. `tower_image_size`: the SigLIP tower's
    input size (SD 1.5: 384 beside the decoder's image_size 512)."""
    if config.visual_tokens:
        token_store.TokenStore(config.visual_tokens).check(
            image_size=tower_image_size, num_tokens=config.num_image_tokens,
            where="data config field 'visual_tokens'")
    dataset = pipeline.record_dataset(sources, config).map(
        FirstImage(config.image_size, tower_image_size, config.visual_tokens))
    dataset = dataset.batch(config.batch_size, drop_remainder=True, batch_fn=_stack)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)))
