"""Text-only conversation records: the data of the LLM text stage and of text evaluation.

Records must be text-only: a record with an "image", "images" or "video" field stops the
run with an error naming its file and line. Other unusable records (too long, malformed,
no response) are counted and reported by the pipeline, never dropped silently.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import pipeline
from metamorph_jax.data.packing import PackedBatchIterator
from metamorph_jax.input_errors import InputError

IMAGE_FIELDS = ("image", "images", "video")


class TextStageError(InputError, ValueError):
    """A record the text stage cannot train on (it holds images or a video)."""


class TextOnlyCheck:
    """Pipeline map before rendering: a record with images stops the run, naming file:line.

    Records that are not valid JSON pass through: the renderer counts them as
    "malformed_json" like any other bad record.
    """

    def __call__(self, element: dict) -> dict:
        raw = element["raw"]
        try:
            record = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        except (json.JSONDecodeError, UnicodeDecodeError):
            return element
        if isinstance(record, dict):
            for field in IMAGE_FIELDS:
                if record.get(field) is not None:
                    raise TextStageError(
                        f"{element['where']}: field {field!r}: the LLM text stage trains and "
                        "evaluates on text-only records; remove records with images or videos")
        return element


def text_special_ids(tokenizer) -> conv.SpecialIds:
    """Ids for the renderer. Text-only records never emit image tokens, so the image ids
    are marked unused (-1) instead of adding tokens the model has no rows for."""
    return conv.SpecialIds(image_start_id=-1, image_end_id=-1, placeholder_id=0,
                           vocab_size=len(tokenizer))


def _text_config(config: pipeline.DataConfig) -> pipeline.DataConfig:
    return dataclasses.replace(config, max_images_per_row=0, image_size=1)


def text_batches(sources: Sequence[pipeline.Source], tokenizer,
                 config: pipeline.DataConfig) -> PackedBatchIterator:
    """Packed batches of text-only records: pipeline.build_dataset with the TextOnlyCheck
    in front of rendering and no image slots (so no image buffers are allocated)."""
    return pipeline.make_iterator(sources, tokenizer, text_special_ids(tokenizer),
                                  _text_config(config), record_check=TextOnlyCheck())


def count_text_batches(sources: Sequence[pipeline.Source], tokenizer,
                       config: pipeline.DataConfig) -> int:
    """The number of batches text_batches yields (counting.count_packed_batches)."""
    from metamorph_jax.data import counting
    return counting.count_packed_batches(sources, tokenizer, text_special_ids(tokenizer),
                                         _text_config(config), record_check=TextOnlyCheck())


def check_text_only(batch: dict) -> None:
    """Second line of defence after packing: no image slot may reach the text step."""
    if np.any(batch["image_index"] >= 0) or np.any(batch["vision_mask"]) or \
            np.any(batch["image_valid"]):
        raise TextStageError("a packed batch holds image positions; the LLM text stage "
                             "takes text-only records")


def write_text_records(path: str | Path, count: int = 64, seed: int = 0) -> Path:
    """Write `count` text-only conversation records about Shapes-world scenes (the scene
    described in words, a question, its answer) as JSONL: a small text data set for the
    tiny config, demos and tests."""
    from metamorph_jax.data import shapes
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index in range(count):
            scene = shapes.random_scene(rng)
            question, answer = shapes.vqa(scene, rng)
            record = {"id": f"text{index}", "conversations": [
                {"from": "human", "value": f"there is {shapes.caption(scene)} . {question.lower()}"},
                {"from": "gpt", "value": answer}]}
            handle.write(json.dumps(record) + "\n")
    return path
