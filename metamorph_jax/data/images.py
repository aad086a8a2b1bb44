"""Image decoding and SigLIP preprocessing on the host; video frame sampling.

`load_image(path, size)` returns float32 [size, size, 3] in [-1, 1], computed the way
transformers' SigLIP image processor (PIL backend) computes it:

1. decode with PIL and convert to RGB; images with an alpha band or a palette
   transparency are composited onto white; greyscale, palette and CMYK go through
   PIL's own `convert("RGB")`;
2. resize to (size, size) with PIL bicubic resampling on the uint8 image;
3. rescale by 1/255 (in float64, then float32) and normalise with mean 0.5, std 0.5.

`load_image_crop(path, size)` is the decoder's (the VAE's) input, the authors' visualiser
preprocessing (torchvision Resize(size) + CenterCrop(size)): the short side resized to
`size` with PIL bilinear resampling, the centre size x size cut out, then the same
normalisation to [-1, 1]. A square image is only resized; one already `size` square is
unchanged. The decoder's condition tokens come from `load_image` of the same file at the
tower's size (from the original, not from the crop), as the authors' SigLIP processor does.

Videos: `sample_frames(path, fps=1.0)` picks frames at the requested rate (MetaMorph: 1 fps)
from a frame folder, whose files are named by timestamp (`t=1.50.png`, `000150ms.jpg`,
`1.5s.png`) or, when the source rate is given, by frame number; or from a video file
(mp4, webm, ...), decoded with PyAV (`av`), using the frames' presentation times. A clip
longer than `max_frames` seconds at 1 fps is subsampled to `max_frames` frames spread evenly
over the whole clip (first and last frame included), never cut short.
"""
from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from metamorph_jax.input_errors import InputError

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1.0 / 255.0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")

# A truncated file must fail loudly, never decode as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(InputError, ValueError):
    """An image (or video frame folder) that cannot be read; the message names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def open_image(path) -> Image.Image:
    """Decode an image file fully into an RGB PIL image, or raise ImageError naming it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(path, "file does not exist")
    if os.path.getsize(path) == 0:
        raise ImageError(path, "file is empty")
    try:
        with Image.open(path) as image:
            image.load()  # decode now so truncation is caught here
            return to_rgb(image)
    except UnidentifiedImageError:
        raise ImageError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(path, f"corrupt or truncated image ({error})") from None


def resize_uint8(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 [size, size, 3], bicubic-resized (SigLIP's resampling)."""
    image = to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def normalize(pixels_uint8, xp=np):
    """uint8 HWC -> float32 SigLIP input: rescale by 1/255, then mean/std 0.5.

    `xp` may be `jax.numpy`, so batches can travel as uint8 (4x smaller) and be
    normalised on the accelerator; results then agree with `preprocess` to ~1e-7.
    """
    pixels = xp.asarray(pixels_uint8).astype(xp.float32) * xp.float32(RESCALE_FACTOR)
    mean = xp.asarray(IMAGE_MEAN, xp.float32)
    std = xp.asarray(IMAGE_STD, xp.float32)
    return (pixels - mean) / std


def _normalisation_table() -> np.ndarray:
    # The processor's arithmetic (float64 rescale, float32 cast, float32 mean/std) applied
    # to all 256 byte values once; a lookup then gives bit-identical results, faster.
    values = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(IMAGE_MEAN, np.float32)
    std = np.asarray(IMAGE_STD, np.float32)
    return ((values[:, None] - mean) / std).astype(np.float32)  # [256, 3]


_TABLE = _normalisation_table()
_SAME_FOR_ALL_CHANNELS = bool(np.all(_TABLE == _TABLE[:, :1]))


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> float32 [size, size, 3], SigLIP normalisation (mean/std 0.5)."""
    return _normalise_uint8(resize_uint8(image, size))


def resize_crop_uint8(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 [size, size, 3]: short side to `size` (PIL bilinear, the
    long side scaled and truncated as torchvision's Resize does), then the centre crop
    (torchvision's CenterCrop offsets: round((side - size) / 2))."""
    image = to_rgb(image)
    width, height = image.size
    if width <= height:
        scaled = (size, int(size * height / width))
    else:
        scaled = (int(size * width / height), size)
    if scaled != image.size:
        image = image.resize(scaled, resample=Image.Resampling.BILINEAR)
    width, height = image.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    if (width, height) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def _normalise_uint8(pixels: np.ndarray) -> np.ndarray:
    if _SAME_FOR_ALL_CHANNELS:
        return np.take(_TABLE[:, 0], pixels)
    return _TABLE[pixels, np.arange(3)]


def preprocess_crop(image: Image.Image, size: int) -> np.ndarray:
    """RGB PIL image -> float32 [size, size, 3] in [-1, 1], short side resized and centre
    cropped (the decoder's VAE input; see the module docstring)."""
    return _normalise_uint8(resize_crop_uint8(image, size))


def load_image_crop(path, size: int) -> np.ndarray:
    """Decode `path` to the decoder's float32 [size, size, 3] (preprocess_crop)."""
    return preprocess_crop(open_image(path), size)


def load_image(path, size: int, dtype: str = "float32") -> np.ndarray:
    """Decode `path` to [size, size, 3]: float32 normalised (default), or "uint8" resized
    only (normalise later with `normalize`). ImageError if unusable."""
    if dtype == "uint8":
        return resize_uint8(open_image(path), size)
    if dtype != "float32":
        raise ValueError(f"image dtype must be float32 or uint8, got {dtype!r}")
    return preprocess(open_image(path), size)


def denormalize(pixels: np.ndarray) -> np.ndarray:
    """Inverse of the normalisation: float [-1, 1] HWC -> uint8 HWC (for saving/scoring)."""
    mean = np.asarray(IMAGE_MEAN, np.float32)
    std = np.asarray(IMAGE_STD, np.float32)
    values = (np.asarray(pixels, np.float32) * std + mean) * 255.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


# --- video frames ---------------------------------------------------------------------

_TIMESTAMP_PATTERNS = (
    # "t=1.50", "time_1.5s", "1.500s": seconds
    (re.compile(r"(?:^|[^0-9.])(\d+(?:\.\d+)?)s$"), 1.0),
    (re.compile(r"^t=?(\d+(?:\.\d+)?)$"), 1.0),
    # "000150ms": milliseconds
    (re.compile(r"(\d+)ms$"), 1e-3),
)
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def frame_files(folder) -> list[str]:
    """Image files in a frame folder, in name order; ImageError if none or not a folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ImageError(folder, "frame folder does not exist")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ImageError(folder, "frame folder holds no image files")
    return [os.path.join(folder, n) for n in names]


def frame_time(path, source_fps: float | None) -> float:
    """Time in seconds of one frame file: from a timestamp in its name, or number / fps."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if source_fps is None:
        for pattern, scale in _TIMESTAMP_PATTERNS:
            match = pattern.search(stem)
            if match:
                return float(match.group(1)) * scale
        raise ImageError(
            path, "frame name carries no timestamp (e.g. 't=1.5', '1.5s', '1500ms'); "
            "give the source fps for numbered frames")
    match = _NUMBER.search(stem)
    if match is None:
        raise ImageError(path, "frame name carries no frame number")
    return int(match.group(1)) / float(source_fps)


def is_video_file(path) -> bool:
    return os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def _sampling_picks(times: np.ndarray, fps: float) -> list[int]:
    """Indices (into sorted `times`) of the first frame at or after t0, t0 + 1/fps, ..."""
    picked: list[int] = []
    step = 1.0 / fps
    t = times[0]
    while t <= times[-1] + 1e-9:
        index = int(np.searchsorted(times, t - 1e-9, side="left"))
        if index < len(times) and (not picked or picked[-1] != index):
            picked.append(index)
        t += step
    return picked


def _even_picks(times: np.ndarray, count: int) -> list[int]:
    """Indices (into sorted `times`) of `count` frames evenly spaced in time over the whole
    clip: the frames nearest to linspace(first time, last time, count) (earlier on a tie),
    so the first and the last frame are always among them (one frame: the first)."""
    targets = np.linspace(times[0], times[-1], count)
    after = np.clip(np.searchsorted(times, targets, side="left"), 0, len(times) - 1)
    before = np.clip(after - 1, 0, len(times) - 1)
    nearer = np.where(np.abs(times[before] - targets) <= np.abs(times[after] - targets),
                      before, after)
    return sorted(set(int(i) for i in nearer))


def pick_frames(times: np.ndarray, fps: float, max_frames: int | None) -> list[int]:
    """Indices (into sorted `times`) of the frames a clip is sampled to: one per 1/fps
    seconds (`_sampling_picks`); a clip that gives more than `max_frames` is instead
    sampled to `max_frames` frames evenly spaced over its whole length (`_even_picks`)."""
    picked = _sampling_picks(times, fps)
    if max_frames is not None and len(picked) > max_frames:
        picked = _even_picks(times, max_frames)
    return picked


def _video_frames(path: str) -> tuple[np.ndarray, list[int] | None]:
    """(presentation times in s, ascending; their pts) of the first video stream's frames,
    read from the packets without decoding. Packets without pts: frames numbered at the
    average rate, pts None (the decoder's k-th frame is then frame k)."""
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        stamps = [packet.pts for packet in container.demux(stream) if packet.size]
        if stamps and all(p is not None for p in stamps):
            stamps = sorted(set(stamps))
            return np.asarray(stamps, np.float64) * float(stream.time_base), stamps
        return np.arange(len(stamps), dtype=np.float64) / float(stream.average_rate or 1), None


def sample_video(path, fps: float = 1.0, max_frames: int | None = None) -> list[np.ndarray]:
    """Decode a video file and pick frames by presentation time (`pick_frames`): uint8
    HWC RGB. The times come from a pass over the packets, so only the picked frames are
    converted and kept, however long the clip."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(path, "file does not exist")
    try:
        import av
    except ImportError:
        raise ImageError(path, "decoding video files needs PyAV (pip install av); "
                               "or pass a folder of frames") from None
    try:
        times, stamps = _video_frames(path)
        if not len(times):
            raise ImageError(path, "video holds no frames")
        chosen = pick_frames(times, fps, max_frames)
        wanted = set(chosen) if stamps is None else {stamps[i] for i in chosen}
        picked: list[np.ndarray] = []
        with av.open(path) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if (index if stamps is None else frame.pts) in wanted:
                    picked.append(frame.to_ndarray(format="rgb24"))
        if len(picked) != len(chosen):
            raise ImageError(path, f"corrupt video: {len(chosen)} frames picked from the "
                                   f"packets' times, {len(picked)} of them decoded")
        return picked
    except ImageError:
        raise
    except Exception as error:  # PyAV raises its own error types for broken files
        raise ImageError(path, f"corrupt or unreadable video ({type(error).__name__}: {error})") from None


def sample_frames(folder, fps: float = 1.0, source_fps: float | None = None,
                  max_frames: int | None = None) -> list:
    """Pick frames of a frame folder (paths) or video file (uint8 arrays) at `fps` frames
    per second (MetaMorph uses 1 fps).

    Sampling times are t0, t0 + 1/fps, ... up to the last frame's time (t0 = first
    frame's time); for each, the first frame at or after that time is taken (so the
    first frame always is). A clip that would give more than `max_frames` frames is
    sampled to `max_frames` frames spread evenly over its whole length instead (first and
    last frame included; fewer only where the clip lacks frames over a gap longer than
    their spacing), deterministically (`pick_frames`).
    """
    if is_video_file(folder) and not os.path.isdir(folder):
        return sample_video(folder, fps, max_frames)
    files = frame_files(folder)
    times = np.asarray([frame_time(f, source_fps) for f in files], np.float64)
    order = np.argsort(times, kind="stable")
    files = [files[i] for i in order]
    picked = pick_frames(times[order], fps, max_frames)
    return [files[i] for i in picked]


def save_png(pixels_uint8: np.ndarray, path) -> None:
    """Write a uint8 HWC array as PNG, creating folders."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.fromarray(np.asarray(pixels_uint8, np.uint8)).save(path)
