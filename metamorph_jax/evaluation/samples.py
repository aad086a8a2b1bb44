"""One benchmark question (`Sample`), the error every reader raises for a bad file, and
decoding a sample's images.

A sample's images are file paths, encoded image bytes (from a TSV's base64 column) or
uint8 HWC arrays; a video sample holds a video file or frame folder path, sampled into
frames with `data.images.sample_frames` (MetaMorph's 1 fps) when the model needs them.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from metamorph_jax.data import images as images_lib
from metamorph_jax.input_errors import InputError


class BenchmarkFileError(InputError, ValueError):
    """A benchmark file that cannot be used as given; names the file, the row and the field."""

    def __init__(self, path, row, field: str | None, message: str):
        where = f"{path}" + (f", row {row}" if row is not None else "")
        where += f", field {field!r}" if field else ""
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.field = str(path), row, field


@dataclasses.dataclass
class Sample:
    """One question. `choices` maps option letters to option texts, in letter order (empty
    for short-answer benchmarks); `answer` is the correct letter, the reference answer, or
    (TextVQA) the list of human answers. `group` ties samples scored together (MMBench's
    circular rotations, MMVP's pairs). `where` is "file, row N" for error messages."""
    id: str
    question: str
    answer: Any
    images: list = dataclasses.field(default_factory=list)
    video: str | None = None
    choices: dict = dataclasses.field(default_factory=dict)
    category: str | None = None
    hint: str | None = None
    group: str | None = None
    where: str = "?"
    extra: dict = dataclasses.field(default_factory=dict)


def decode_image(image, where: str = "?") -> Image.Image:
    """A path, encoded bytes or uint8 HWC array -> RGB PIL image (transparency on white)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{where}: image arrays must be uint8 [H, W, 3], got "
                             f"{image.dtype} {image.shape}")
        return Image.fromarray(image)
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as decoded:
                decoded.load()
                return images_lib.to_rgb(decoded)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError) as error:
            raise ValueError(f"{where}: undecodable image ({type(error).__name__}: {error})") from None
    try:
        return images_lib.open_image(image)
    except images_lib.ImageError as error:
        raise ValueError(f"{where}: {error}") from None


def sample_images(sample: Sample) -> list[Image.Image]:
    """The sample's images decoded, in placeholder order; errors name the file and row."""
    return [decode_image(image, f"{sample.where}, image {i}") for i, image in enumerate(sample.images)]


def sample_video_frames(sample: Sample, fps: float = 1.0, max_frames: int | None = None,
                        source_fps: float | None = None) -> list:
    """Frames of a video sample picked the way the training data kinds pick them
    (`data.images.sample_frames`: frame paths for a folder, uint8 arrays for a file)."""
    if sample.video is None:
        raise ValueError(f"{sample.where}: not a video sample")
    try:
        return images_lib.sample_frames(sample.video, fps=fps, source_fps=source_fps,
                                        max_frames=max_frames)
    except images_lib.ImageError as error:
        raise ValueError(f"{sample.where}: {error}") from None
