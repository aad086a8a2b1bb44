"""Image-caption pairs for the tower stage (SigLIP's sigmoid image-text pretraining).

Any LLaVA-format record file whose records carry an image and a caption will do: the
Shapes world's text_to_image.jsonl (tasks.text_to_image keeps the caption in the record's
"caption" field, beside the request wording and the `<image>` reply), or an image-caption
set written the same way. Records pass through the VPiT pipeline's shuffle / mixture /
process shard (pipeline.record_dataset), so `seed`, `num_epochs` and the sharding rules
are the same, and the iterator's get_state/set_state make it resumable.

A pair: the record's first image at `image_size` with SigLIP's preprocessing
(images.preprocess: square bicubic resize, [-1, 1]: the tower's input in every VPiT
stage), and the caption tokenised as SigLIP's text tower is fed: the caption's tokens,
then the end-of-text token, then the pad token up to exactly `seq_len` positions (the
tokenizer's pad token, else its end-of-text token, which is SigLIP's own padding). No
attention mask: SigLIP's text tower reads the padding and pools the last position.

A batch: {"images": float32 [B, S, S, 3], "input_ids": int32 [B, seq_len],
"record_ids": object [B] (host only: "id (file:line)")}.

A record without an image, without a caption string, or with a caption longer than
`seq_len` - 1 tokens stops the stage with CaptionPairError naming the file, the line and
the field (nothing is skipped or truncated silently).
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import pipeline

CAPTION_FIELD = "caption"


class CaptionPairError(ValueError):
    """A record the tower stage cannot use; the message names the file, line and field."""


def caption_ids(tokenizer, caption: str, seq_len: int, where: str = "?") -> np.ndarray:
    """int32 [seq_len]: the caption's tokens, end-of-text, then padding (module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CaptionPairError("the tokenizer has no end-of-text token; the text tower's "
                               "captions end with one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = list(tokenizer(caption, add_special_tokens=False)["input_ids"]) + [eos]
    if len(ids) > seq_len:
        raise CaptionPairError(
            f"{where}: field {CAPTION_FIELD!r}: the caption is {len(ids) - 1} tokens, the text "
            f"tower reads at most {seq_len - 1} (data.seq_len = {seq_len} with the end-of-text "
            f"token); raise data.seq_len (and the text tower's max_position_embeddings)")
    return np.asarray(ids + [pad] * (seq_len - len(ids)), np.int32)


class CaptionPair:
    """Record element -> {"image", "input_ids", "record_id"}; pickles (runs in grain workers)."""

    def __init__(self, tokenizer, image_size: int, seq_len: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.seq_len = seq_len

    def __call__(self, element: dict) -> dict:
        where = element["where"]
        try:
            raw = conv.record_object(element["raw"], where)
        except conv.RecordError as error:   # its message starts with `where`
            raise CaptionPairError(f"{error} (the tower stage's record)") from None
        caption = raw.get(CAPTION_FIELD)
        if not isinstance(caption, str) or not caption.strip():
            raise CaptionPairError(
                f"{where}: field {CAPTION_FIELD!r} is {caption!r}; the tower stage trains on "
                "records that carry their image's caption as a non-empty string (the Shapes "
                "world's text_to_image.jsonl; rebuild a world made before the field existed)")
        try:
            record = conv.parse_record(raw, where=where, image_root=element["image_root"])
        except conv.RecordError as error:
            raise CaptionPairError(f"{error} (the tower stage's record)") from None
        if not record.image_paths:
            raise CaptionPairError(f"{where}: field 'image' / 'images': the record has no "
                                   "image; the tower stage trains on image-caption pairs")
        first = record.image_paths[0]
        try:
            if isinstance(first, np.ndarray):
                from PIL import Image
                image = images_lib.preprocess(Image.fromarray(first), self.image_size)
            else:
                image = images_lib.load_image(first, self.image_size)
        except images_lib.ImageError as error:
            raise CaptionPairError(f"{where}: {error}") from None
        record_id = f"{record.id} ({where})" if record.id != where else where
        return {"image": image, "input_ids": caption_ids(self.tokenizer, caption, self.seq_len,
                                                         where),
                "record_id": record_id}


def _stack(elements: Sequence[dict]) -> dict:
    ids = np.empty(len(elements), object)
    ids[:] = [element["record_id"] for element in elements]
    return {"images": np.stack([element["image"] for element in elements]),
            "input_ids": np.stack([element["input_ids"] for element in elements]),
            "record_ids": ids}


def caption_batches(sources: Sequence[pipeline.Source], tokenizer,
                    config: pipeline.DataConfig):
    """A resumable iterator of image-caption batches (see the module docstring):
    `batch_size` pairs per process of `image_size` images and `seq_len`-token captions, the
    last incomplete batch dropped."""
    if config.visual_tokens:
        raise CaptionPairError("data config field 'visual_tokens': the tower stage trains the "
                               "tower, so it reads pixels, not stored tokens")
    dataset = pipeline.record_dataset(sources, config).map(
        CaptionPair(tokenizer, config.image_size, config.seq_len))
    dataset = dataset.batch(config.batch_size, drop_remainder=True, batch_fn=_stack)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)))
