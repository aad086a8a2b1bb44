"""The Shapes world: a deterministic synthetic data set for all six VPiT data kinds.

Scenes hold one to three shapes (circle, square, triangle) in six colours and two
sizes, each in its own cell of a 3x3 grid, drawn without anti-aliasing on white. The
world is written as PNGs plus LLaVA-format JSONL records (the format `conversation.py`
reads), one folder per split::

    OUT/images/<split>/*.png     scenes (also the targets of edits and generation)
    OUT/clips/<split>/<clip>/    frame folders of one moving shape, frames named 000000ms.png
    OUT/crops/<split>/*.png      zoomed crops for visual thinking
    OUT/<split>/image_qa.jsonl       colour / shape / count / position / yes-no questions
    OUT/<split>/text_to_image.jsonl  caption -> scene (records carry "caption", and
                                     "target" for scoring)
    OUT/<split>/image_to_image.jsonl recolour / move / add / remove edits ("target": the
                                     edited scene's shapes)
    OUT/<split>/video.jsonl          forward / reverse / reorder / next_n / time_interval
                                     (records carry "targets": per predicted frame, its
                                     shapes for scoring, or null where undefined)
    OUT/<split>/video_qa.jsonl       "which way does the shape move?"
    OUT/<split>/visual_thinking.jsonl  zoom into one cell, then answer
    OUT/world.json                   the settings the world was made with

Image paths in records are relative to OUT (pass OUT as the pipeline's image root).
Splits (train / validation / test) are disjoint: a scene (or clip) belongs to the split
given by a hash of its description, and every record of a split uses only that split's
scenes (an edit's source and target both).

`read_shape(pixels)` is the oracle: it reads a single-shape image back into colour,
shape, size and grid position from its pixels, so generated images can be scored.

Command line::

    python -m metamorph_jax.data.shapes --out data/shapes [--seed 0] [--image-size 64] \\
        [--train 2000] [--validation 200] [--test 200] [--clips 100]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from metamorph_jax.data import tasks

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.55, "large": 0.9}   # fraction of the cell the shape spans
GRID = 3
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
SPLITS = ("train", "validation", "test")
BACKGROUND = (255, 255, 255)


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
    shape: str
    colour: str
    size: str
    cell: int   # 0..8, row-major over the 3x3 grid

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} in the {self.position}"

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "position": self.position}


Scene = tuple  # tuple[Shape, ...] sorted by cell


def scene_key(scene: Scene) -> str:
    return "_".join(f"{s.cell}{s.shape[0]}{s.colour}{s.size[0]}" for s in sorted(scene, key=lambda s: s.cell))


def split_of(key: str) -> str:
    """Stable split assignment: 10% test, 10% validation, 80% train, by hash of the key."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


# --- drawing ------------------------------------------------------------------------------

def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: str, size: str, cy: float, cx: float,
          cell_px: float) -> None:
    half = SIZES[size] * cell_px / 2
    fill = COLOURS[colour]
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def cell_centre(cell: int, image_size: int) -> tuple[float, float]:
    cell_px = image_size / GRID
    row, col = divmod(cell, GRID)
    return (row + 0.5) * cell_px, (col + 0.5) * cell_px


def render_scene(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Draw a scene; uint8 [image_size, image_size, 3]."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in scene:
        cy, cx = cell_centre(item.cell, image_size)
        _draw(draw, item.shape, item.colour, item.size, cy, cx, image_size / GRID)
    return np.asarray(image)


def render_at(item: Shape, cy: float, cx: float, image_size: int) -> np.ndarray:
    """One shape centred at pixel (cy, cx) (used for clips between grid cells)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    _draw(ImageDraw.Draw(image), item.shape, item.colour, item.size, cy, cx, image_size / GRID)
    return np.asarray(image)


# --- the oracle ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reading:
    colour: str
    shape: str
    size: str
    position: str


def read_shape(pixels: np.ndarray, threshold: int = 60) -> Reading | None:
    """Read a single-shape image (uint8 HWC, any square size) back into its attributes.

    Foreground = pixels differing from white by more than `threshold` in some channel.
    Colour: nearest palette colour to the median foreground pixel. Position: grid cell of
    the foreground centroid. Shape: fraction of the bounding box the shape fills (square
    ~1, circle ~pi/4, triangle ~1/2). Size: bounding-box side relative to a cell.
    Returns None when there is no foreground.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError("read_shape expects uint8 pixels (see images.denormalize)")
    height, width = pixels.shape[:2]
    diff = np.abs(pixels.astype(np.int32) - np.asarray(BACKGROUND)).max(-1)
    mask = diff > threshold
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    median = np.median(pixels[mask].astype(np.float64), axis=0)
    names = list(COLOURS)
    distances = [np.sum((median - np.asarray(COLOURS[n])) ** 2) for n in names]
    colour = names[int(np.argmin(distances))]
    row = min(int(ys.mean() / (height / GRID)), GRID - 1)
    col = min(int(xs.mean() / (width / GRID)), GRID - 1)
    box_h = ys.max() - ys.min() + 1
    box_w = xs.max() - xs.min() + 1
    fill = mask.sum() / float(box_h * box_w)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
    side = max(box_h, box_w) / (width / GRID)
    size = "large" if side > (SIZES["small"] + SIZES["large"]) / 2 else "small"
    return Reading(colour, shape, size, POSITIONS[row * GRID + col])


# --- sampling -----------------------------------------------------------------------------

def random_shape(rng, cell: int) -> Shape:
    return Shape(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                 list(SIZES)[rng.integers(len(SIZES))], int(cell))


def random_scene(rng, max_objects: int = 3) -> Scene:
    count = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    return tuple(sorted((random_shape(rng, c) for c in cells), key=lambda s: s.cell))


def caption(scene: Scene) -> str:
    parts = [s.describe() for s in scene]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_NUMBER_WORDS = ("zero", "one", "two", "three")


def vqa(scene: Scene, rng) -> tuple[str, str]:
    """One (question, answer) about a scene: colour, shape, count, position or yes/no."""
    kinds = ["count", "yesno", "position"]
    by_shape = {s.shape: [t for t in scene if t.shape == s.shape] for s in scene}
    by_colour = {s.colour: [t for t in scene if t.colour == s.colour] for s in scene}
    if any(len(v) == 1 for v in by_shape.values()):
        kinds.append("colour")
    if any(len(v) == 1 for v in by_colour.values()):
        kinds.append("shape")
    kind = kinds[rng.integers(len(kinds))]
    if kind == "colour":
        shape = sorted(k for k, v in by_shape.items() if len(v) == 1)[rng.integers(
            sum(len(v) == 1 for v in by_shape.values()))]
        return f"What colour is the {shape}?", by_shape[shape][0].colour
    if kind == "shape":
        colour = sorted(k for k, v in by_colour.items() if len(v) == 1)[rng.integers(
            sum(len(v) == 1 for v in by_colour.values()))]
        return f"What shape is the {colour} object?", by_colour[colour][0].shape
    if kind == "count":
        if rng.integers(2):
            return "How many shapes are there?", _NUMBER_WORDS[len(scene)]
        shape = SHAPES[rng.integers(len(SHAPES))]
        count = sum(s.shape == shape for s in scene)
        return f"How many {shape}s are there?", _NUMBER_WORDS[count]
    if kind == "position":
        item = scene[rng.integers(len(scene))]
        return f"Where is the {item.colour} {item.shape}?", item.position
    # yes / no: half the time about a shape that is there
    if rng.integers(2):
        item = scene[rng.integers(len(scene))]
        return f"Is there a {item.colour} {item.shape}?", "yes"
    while True:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if not any(s.colour == colour and s.shape == shape for s in scene):
            return f"Is there a {colour} {shape}?", "no"


def edit(scene: Scene, rng) -> tuple[str, Scene]:
    """One edit (recolour, move, add, remove) of a scene: (instruction, edited scene)."""
    free = [c for c in range(GRID * GRID) if all(s.cell != c for s in scene)]
    kinds = ["recolour", "move"] + (["add"] if len(scene) < 3 else []) + (["remove"] if len(scene) > 1 else [])
    kind = kinds[rng.integers(len(kinds))]
    index = int(rng.integers(len(scene)))
    item = scene[index]
    rest = scene[:index] + scene[index + 1:]
    name = f"the {item.colour} {item.shape} in the {item.position}"
    if kind == "recolour":
        colour = [c for c in COLOURS if c != item.colour][rng.integers(len(COLOURS) - 1)]
        new = dataclasses.replace(item, colour=colour)
        return f"make {name} {colour}", tuple(sorted(rest + (new,), key=lambda s: s.cell))
    if kind == "move":
        cell = free[rng.integers(len(free))]
        new = dataclasses.replace(item, cell=int(cell))
        return f"move {name} to the {POSITIONS[cell]}", tuple(sorted(rest + (new,), key=lambda s: s.cell))
    if kind == "add":
        new = random_shape(rng, free[rng.integers(len(free))])
        return f"add {new.describe()}", tuple(sorted(scene + (new,), key=lambda s: s.cell))
    return f"remove {name}", rest


# --- writing the world --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 64
    scenes: tuple = (("train", 2000), ("validation", 200), ("test", 200))
    clips: tuple = (("train", 100), ("validation", 20), ("test", 20))
    clip_frames: int = 4


def _sample_unique(rng, count: int, split: str, make, key_of) -> list:
    found, seen = [], set()
    attempts = 0
    while len(found) < count:
        attempts += 1
        if attempts > 1000 * (count + 10):
            raise ValueError(f"the Shapes world has fewer than {count} distinct {split} items")
        item = make()
        key = key_of(item)
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        found.append(item)
    return found


def clip_key(item: Shape, direction: str) -> str:
    return f"clip_{item.cell}{item.shape}{item.colour}{item.size}_{direction}"


def random_clip(rng) -> tuple[Shape, str]:
    """A shape starting on the grid edge opposite to its direction of motion."""
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    lane = int(rng.integers(GRID))
    d_row, d_col = DIRECTIONS[direction]
    row = lane if d_row == 0 else (0 if d_row > 0 else GRID - 1)
    col = lane if d_col == 0 else (0 if d_col > 0 else GRID - 1)
    return random_shape(rng, row * GRID + col), direction


def clip_frames(item: Shape, direction: str, frames: int, image_size: int) -> list[np.ndarray]:
    """Frames one second apart; the shape moves (GRID-1)/(frames-1) cells per second."""
    cy, cx = cell_centre(item.cell, image_size)
    d_row, d_col = DIRECTIONS[direction]
    step = (GRID - 1) * image_size / GRID / max(frames - 1, 1)
    return [render_at(item, cy + d_row * step * t, cx + d_col * step * t, image_size)
            for t in range(frames)]


def clip_frame_shapes(item: Shape, direction: str, frames: int) -> list[Shape | None]:
    """What each frame of clip_frames(item, direction, frames, ...) shows: the shape in the
    grid cell that holds its centre (where the oracle reads it), or None for a frame whose
    centre lies on a cell boundary (its position is not defined). Exact: positions are
    counted in fractions of a cell, as clip_frames moves the shape."""
    from fractions import Fraction

    row, col = divmod(item.cell, GRID)
    d_row, d_col = DIRECTIONS[direction]
    shown = []
    for t in range(frames):
        moved = Fraction((GRID - 1) * t, max(frames - 1, 1))
        y, x = Fraction(2 * row + 1, 2) + d_row * moved, Fraction(2 * col + 1, 2) + d_col * moved
        if y.denominator == 1 or x.denominator == 1:
            shown.append(None)
        else:
            shown.append(dataclasses.replace(item, cell=int(y) * GRID + int(x)))
    return shown


def _frame_targets(record: dict, frames: list[str], shown: list) -> list:
    """A video record's "targets": per predicted image (the record's images after the
    prompt's), the shapes its frame shows, or None where clip_frame_shapes has none."""
    prompt_images = record["conversations"][0]["value"].count(tasks.IMG)
    return [None if shown[frames.index(path)] is None else [shown[frames.index(path)].to_dict()]
            for path in record["images"][prompt_images:]]


def write_world(out: str, config: WorldConfig = WorldConfig(), progress: bool = True) -> dict:
    """Write the whole world under `out`; returns {split: {kind: record count}}."""
    from metamorph_jax.data import images as images_lib

    counts: dict = {}
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([config.seed, split_index])
        n_scenes = dict(config.scenes).get(split, 0)
        n_clips = dict(config.clips).get(split, 0)
        scenes = _sample_unique(rng, n_scenes, split, lambda: random_scene(rng), scene_key)
        records = {kind: [] for kind in ("image_qa", "text_to_image", "image_to_image", "video",
                                         "video_qa", "visual_thinking")}
        written: set = set()

        def scene_path(scene):
            key = scene_key(scene)
            rel = f"images/{split}/{key}.png"
            if key not in written:
                images_lib.save_png(render_scene(scene, config.image_size), os.path.join(out, rel))
                written.add(key)
            return rel

        bar = tqdm(scenes, desc=f"shapes {split}", unit="scene", disable=not progress)
        for index, scene in enumerate(bar):
            key = scene_key(scene)
            path = scene_path(scene)
            question, answer = vqa(scene, rng)
            records["image_qa"].append({"id": f"{split}-qa-{index}", "image": path, "conversations": [
                {"from": "human", "value": "<image>\n" + question},
                {"from": "gpt", "value": answer}]})
            t2i = tasks.text_to_image(f"{split}-t2i-{index}", path, caption(scene), rng)
            t2i["target"] = [s.to_dict() for s in scene]
            records["text_to_image"].append(t2i)
            # An edit whose result belongs to another split is redrawn (splits stay disjoint).
            for _ in range(20):
                instruction, edited = edit(scene, rng)
                if split_of(scene_key(edited)) == split:
                    i2i = tasks.image_to_image(f"{split}-i2i-{index}", path, instruction,
                                               scene_path(edited), rng)
                    i2i["target"] = [s.to_dict() for s in edited]
                    records["image_to_image"].append(i2i)
                    break
            if len(scene) >= 2:
                item = scene[rng.integers(len(scene))]
                cell_px = config.image_size / GRID
                row, col = divmod(item.cell, GRID)
                box = [col * cell_px, row * cell_px, (col + 1) * cell_px, (row + 1) * cell_px]
                crop = tasks.zoom_crop(os.path.join(out, path), box,
                                       os.path.join(out, f"crops/{split}/{key}_{item.cell}.png"))
                records["visual_thinking"].append(tasks.visual_thinking(
                    f"{split}-vt-{index}", path, os.path.relpath(crop, out),
                    f"What colour is the shape in the {item.position}?", item.colour, rng))

        clips = _sample_unique(rng, n_clips, split, lambda: random_clip(rng), lambda c: clip_key(*c))
        for index, (item, direction) in enumerate(clips):
            folder = f"clips/{split}/{clip_key(item, direction)}"
            frames = []
            for t, pixels in enumerate(clip_frames(item, direction, config.clip_frames, config.image_size)):
                rel = f"{folder}/{t * 1000:06d}ms.png"
                images_lib.save_png(pixels, os.path.join(out, rel))
                frames.append(rel)
            shown = clip_frame_shapes(item, direction, config.clip_frames)
            for kind in tasks.VIDEO_KINDS:
                record = tasks.video_task(f"{split}-video-{index}-{kind}", frames, kind, rng)
                if record is not None:
                    record["targets"] = _frame_targets(record, frames, shown)
                    records["video"].append(record)
            records["video_qa"].append({"id": f"{split}-vqa-{index}", "video": folder, "conversations": [
                {"from": "human", "value": f"<video>\nWhich way does the {item.shape} move?"},
                {"from": "gpt", "value": direction}]})
        counts[split] = {}
        for kind, items in records.items():
            counts[split][kind] = tasks.write_records(items, os.path.join(out, split, f"{kind}.jsonl"))
    with open(os.path.join(out, "world.json"), "w") as handle:
        json.dump({"config": dataclasses.asdict(config), "counts": counts}, handle, indent=1)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the Shapes world (PNGs + JSONL records).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--clips", type=int, default=100, help="train clips (val/test get a fifth)")
    parser.add_argument("--clip-frames", type=int, default=4)
    args = parser.parse_args(argv)
    small = max(1, args.clips // 5)
    config = WorldConfig(seed=args.seed, image_size=args.image_size,
                         scenes=(("train", args.train), ("validation", args.validation), ("test", args.test)),
                         clips=(("train", args.clips), ("validation", small), ("test", small)),
                         clip_frames=args.clip_frames)
    counts = write_world(args.out, config)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
