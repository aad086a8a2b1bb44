"""Counting passes: how many batches a shard of finite data yields, without decoding images.

A stage with `steps=0` trains for one pass over its finite data (training/epoch_steps.py);
records -> packed rows depends on every record's length, so the number of batches is
counted by running the shard's real pipeline (pipeline.record_dataset, the same shuffle,
epochs and shard) up to packing, with one change: images are not read. A record renders
its text and its image slots (the <image> token runs), and each image becomes a 1-pixel
placeholder, so first-fit packing (packing.py) places exactly the samples the real pass
places.

Exact, except for an image file whose content is corrupt: the counting pass checks that
each image file exists and is not empty (what images.open_image refuses before decoding),
but only the real pass decodes, so a corrupt image drops its record there alone, and the
real pass may end a little earlier than counted (the runner then says so).

Decoder batches (image_batches.py) hold one record each and drop the last partial batch:
records // batch_size, and a bad record there is an error, never a skip.
"""
from __future__ import annotations

import os
from typing import Sequence

import grain
import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import pipeline
from metamorph_jax.data.bad_records import bad_marker
from metamorph_jax.data.packing import PackedBatchDataset


class SlotSampleMaker(pipeline.SampleMaker):
    """pipeline.SampleMaker that renders text and image slots and reads no pixels."""
    lengths_only = True

    def image_slots(self, sample: dict, conversation, record_id: str, where: str) -> dict:
        for path in conversation.image_paths:
            if isinstance(path, np.ndarray):
                continue
            path = os.fspath(path)
            if not os.path.exists(path):
                return bad_marker("missing_image", where, f"{path}: file does not exist")
            if os.path.getsize(path) == 0:
                return bad_marker("corrupt_image", where, f"{path}: file is empty")
        sample["record_id"] = record_id
        sample["images"] = np.zeros((len(conversation.image_paths), 1, 1, 3), np.uint8)
        return sample


def count_packed_batches(sources: Sequence[pipeline.Source], tokenizer, ids: conv.SpecialIds,
                         config: pipeline.DataConfig, record_check=None,
                         description: str = "counting") -> int:
    """Batches pipeline.make_iterator(sources, ..., config) yields (config names the shard;
    its num_epochs must be finite), with a tqdm bar over the shard's records."""
    from tqdm import tqdm

    if config.num_epochs is None:
        raise ValueError("field 'num_epochs' is None: data that repeats forever has no end "
                         "to count")
    dataset = pipeline.record_dataset(sources, config)
    total = len(dataset)
    if record_check is not None:
        dataset = dataset.map(record_check)
    dataset = dataset.map(SlotSampleMaker(tokenizer, ids, config))
    iterable = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size))
    if config.worker_count > 0:
        pipeline._absl_flags_ready()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    packed = PackedBatchDataset(iterable, batch_size=config.batch_size, seq_len=config.seq_len,
                                max_images_per_row=config.max_images_per_row,
                                num_image_tokens=config.num_image_tokens, image_size=1,
                                image_dtype="uint8", strict=config.strict, report_every=0)
    batches = 0
    with tqdm(total=total, desc=description, unit="record") as bar:
        for batch in packed:
            batches += 1
            bar.update(sum(len(row) for row in batch["record_ids"]))
    return batches


def count_image_batches(sources: Sequence[pipeline.Source], config: pipeline.DataConfig) -> int:
    """Batches image_batches.image_batches(sources, config) yields (config names the shard)."""
    if config.num_epochs is None:
        raise ValueError("field 'num_epochs' is None: data that repeats forever has no end "
                         "to count")
    return len(pipeline.record_dataset(sources, config)) // config.batch_size
