"""Batches of real images for the decoder stage: each record's first image, in [-1, 1].

The decoder learns to draw an image from the frozen SigLIP tower's tokens of that same
image, so it needs only the pictures: any LLaVA-format record file with images will do
(the Shapes world's image_qa.jsonl, an image-caption set). Records pass through the same
shuffle / mixture / process shard as the VPiT pipeline (pipeline.record_dataset), so
`num_epochs`, `seed` and the sharding rules are the same; the iterator's
get_state/set_state make it resumable.

A batch: {"images": float32 [B, S, S, 3] in [-1, 1] (S = image_size, SigLIP's
normalisation, which is also the decoder's pixel range), "record_ids": object [B]
(host only: "id (file:line)")}.
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import pipeline


class NoImageError(ValueError):
    """A record the decoder stage cannot use (it has no image, or the image is unreadable)."""


class FirstImage:
    """Record element -> {"image", "record_id"}; pickles (runs in grain workers)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

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
                pixels = images_lib.preprocess(Image.fromarray(first), self.image_size)
            else:
                pixels = images_lib.load_image(first, self.image_size, "float32")
        except images_lib.ImageError as error:
            raise NoImageError(f"{where}: {error}") from None
        record_id = f"{record.id} ({where})" if record.id != where else where
        return {"image": pixels.astype(np.float32), "record_id": record_id}


def _stack(elements: Sequence[dict]) -> dict:
    ids = np.empty(len(elements), object)
    ids[:] = [element["record_id"] for element in elements]
    return {"images": np.stack([element["image"] for element in elements]), "record_ids": ids}


def image_batches(sources: Sequence[pipeline.Source], config: pipeline.DataConfig):
    """A resumable iterator of image batches (see the module docstring); `batch_size` rows
    per process, the last incomplete batch dropped."""
    dataset = pipeline.record_dataset(sources, config).map(FirstImage(config.image_size))
    dataset = dataset.batch(config.batch_size, drop_remainder=True, batch_fn=_stack)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)))
