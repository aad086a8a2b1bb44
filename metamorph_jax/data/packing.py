"""First-fit packing of rendered samples into fixed-shape batches, with iterator state.

A packed batch (DESIGN.md) is a dict of numpy arrays, B = batch size, T = seq_len,
N = max_images_per_row, V = num_image_tokens:

=====================  ==============  ======================================================
tokens                 int32 [B,T]     token ids (0 at padding)
positions              int32 [B,T]     0, 1, ... restarting in each segment (0 at padding)
segment_ids            int32 [B,T]     1, 2, ... per packed sample; 0 = padding
text_targets           int32 [B,T]     next token (tokens[t+1] of the same segment), else 0
text_mask              int32 [B,T]     1 where text_targets[t] is trained
image_index            int32 [B,T]     n * V + k at visual token k of the row's image n, else -1
vision_mask            int32 [B,T]     1 where the hidden state predicts the next visual token
vision_target_index    int32 [B,T]     flat index (n * V + k) of that target token, else -1;
                                       always image_index[t + 1]
images                 float32 [B,N,H,W,3]  the row's images in order (zeros where unused);
                                       uint8 (resized, not normalised) with image_dtype="uint8"
                                       with DataConfig.visual_tokens, instead:
visual_tokens          [B,N,V,C]       the images' stored tokens (the store's dtype)
image_valid            int32 [B,N]     1 for the images a row uses
record_ids             object [B]      host only: per row, a tuple of the packed samples'
                                       record ids ("id (file:line)"); never sent to devices
=====================  ==============  ======================================================

Attention masks come from segment_ids (same non-zero segment, causal); nothing in a row
refers across segments.

Packing is first-fit with B bins (rows): each sample goes to the first row where both its
tokens (<= T) and its images (<= N) still fit; a new row opens while fewer than B are
open; a sample that fits nowhere closes the batch and starts the next one. Rows left
empty (only at the end of the data) are all padding.

The iterator's state is the parent's state before the sample that will open the next
batch, plus the bad-record counts: restoring it reproduces the following batches exactly.

Bad-record markers are counted (per reason and per source, bad_records.py) as they are
pulled, used samples per source as they are placed; a source that loses more than
`max_bad_fraction` of its records stops the iterator (at a report, or at the end).
"""
from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

from metamorph_jax.data.bad_records import DEFAULT_MAX_BAD_FRACTION, BadRecordLog, is_bad

TOKEN_KEYS = ("tokens", "text_targets", "text_mask", "vision_mask")
INDEX_KEYS = ("image_index", "vision_target_index")


HOST_KEYS = ("record_ids",)   # batch fields that stay on the host (never sent to devices)


def device_fields(batch: dict) -> dict:
    """The batch without its host-only fields (what a jitted step may take)."""
    return {key: value for key, value in batch.items() if key not in HOST_KEYS}


def image_field(batch_or_sample: dict) -> str:
    """Where a batch or sample keeps its images: "visual_tokens" (precomputed) or "images"."""
    return "visual_tokens" if "visual_tokens" in batch_or_sample else "images"


def empty_batch(batch_size: int, seq_len: int, max_images: int, image_size: int,
                image_dtype: str = "float32", token_shape: tuple | None = None,
                token_dtype=None) -> dict:
    """All-padding batch; with `token_shape` (V, C) it holds `visual_tokens` of
    `token_dtype` in place of `images`."""
    shape = (batch_size, seq_len)
    batch = {key: np.zeros(shape, np.int32) for key in
             ("tokens", "positions", "segment_ids", "text_targets", "text_mask", "vision_mask")}
    batch["image_index"] = np.full(shape, -1, np.int32)
    batch["vision_target_index"] = np.full(shape, -1, np.int32)
    if token_shape is not None:
        batch["visual_tokens"] = np.zeros((batch_size, max_images, *token_shape), token_dtype)
    else:
        batch["images"] = np.zeros((batch_size, max_images, image_size, image_size, 3),
                                   np.dtype(image_dtype))
    batch["image_valid"] = np.zeros((batch_size, max_images), np.int32)
    batch["record_ids"] = np.empty(batch_size, object)
    batch["record_ids"][:] = [()] * batch_size
    return batch


def fill_row(batch: dict, row: int, samples: list[dict], num_image_tokens: int) -> None:
    """Write `samples` one after another into row `row` of `batch` (in place)."""
    offset = 0
    image_offset = 0
    field = image_field(batch)
    for segment, sample in enumerate(samples, start=1):
        length = len(sample["tokens"])
        where = slice(offset, offset + length)
        for key in TOKEN_KEYS:
            batch[key][row, where] = sample[key]
        for key in INDEX_KEYS:
            values = sample[key]
            batch[key][row, where] = np.where(values >= 0, values + image_offset * num_image_tokens, -1)
        batch["positions"][row, where] = np.arange(length, dtype=np.int32)
        batch["segment_ids"][row, where] = segment
        count = len(sample[field])
        if count:
            batch[field][row, image_offset:image_offset + count] = sample[field]
            batch["image_valid"][row, image_offset:image_offset + count] = 1
        offset += length
        image_offset += count
    batch["record_ids"][row] = tuple(sample.get("record_id", "?") for sample in samples)


class PackedBatchDataset(grain.IterDataset):
    """Packs rendered samples (and counts bad-record markers) into batches."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, seq_len: int,
                 max_images_per_row: int, num_image_tokens: int, image_size: int,
                 image_dtype: str = "float32", token_shape: tuple | None = None,
                 token_dtype=None, strict: bool = False, report_every: int = 100,
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        super().__init__(parent)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.max_images = max_images_per_row
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.image_dtype = image_dtype
        self.token_shape = token_shape
        self.token_dtype = token_dtype
        self.strict = strict
        self.report_every = report_every
        self.max_bad_fraction = max_bad_fraction

    def __iter__(self) -> "PackedBatchIterator":
        return PackedBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PackedBatchDataset(batch_size={self.batch_size}, seq_len={self.seq_len})"


class PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, spec: PackedBatchDataset):
        super().__init__(parent)
        self.spec = spec
        self.bad_records = BadRecordLog(strict=spec.strict, max_bad_fraction=spec.max_bad_fraction)
        self._pending: dict | None = None        # sample pulled but not yet placed
        self._pending_state: Any = None          # parent state before that sample
        self._batches = 0
        self._exhausted = False

    def _pull(self):
        """Next good sample and the parent state before it; None at the end of the data."""
        while True:
            # Copied: some grain iterators hand out their live state object.
            state = copy.deepcopy(self._parent.get_state())
            try:
                element = next(self._parent)
            except StopIteration:
                return None, None
            if is_bad(element):
                self.bad_records.add(element)
                continue
            return element, state

    def __next__(self) -> dict:
        spec = self.spec
        rows: list[list[dict]] = []
        used_tokens: list[int] = []
        used_images: list[int] = []
        while not self._exhausted:
            if self._pending is not None:
                sample, state = self._pending, self._pending_state
                self._pending = self._pending_state = None
            else:
                sample, state = self._pull()
                if sample is None:
                    self._exhausted = True
                    break
            length, count = len(sample["tokens"]), len(sample[image_field(sample)])
            for row in range(len(rows)):
                if used_tokens[row] + length <= spec.seq_len and used_images[row] + count <= spec.max_images:
                    break
            else:
                row = len(rows)
                if row == spec.batch_size:  # fits nowhere: it opens the next batch
                    self._pending, self._pending_state = sample, state
                    break
                rows.append([])
                used_tokens.append(0)
                used_images.append(0)
            rows[row].append(sample)
            # counted when placed (a pending sample is in the next batch's state)
            self.bad_records.used(sample.get("source", "?"))
            used_tokens[row] += length
            used_images[row] += count
        if not rows:
            self.bad_records.report(final=True)
            self.bad_records.check(final=True)
            raise StopIteration
        batch = empty_batch(spec.batch_size, spec.seq_len, spec.max_images, spec.image_size,
                            spec.image_dtype, spec.token_shape, spec.token_dtype)
        for index, samples in enumerate(rows):
            fill_row(batch, index, samples, spec.num_image_tokens)
        self._batches += 1
        if spec.report_every and self._batches % spec.report_every == 0:
            self.bad_records.report()
            self.bad_records.check()
        return batch

    def get_state(self) -> dict:
        parent_state = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent_state, "bad_records": self.bad_records.get_state(),
                "batches": self._batches, "exhausted": self._exhausted}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.bad_records.set_state(state["bad_records"])
        self._batches = int(state["batches"])
        self._exhausted = bool(state["exhausted"])
        self._pending = self._pending_state = None

    def __str__(self) -> str:
        return "PackedBatchIterator"
