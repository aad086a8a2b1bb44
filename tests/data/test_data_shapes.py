"""The Shapes world: determinism, disjoint splits, every kind renders, the oracle reads 100%."""
import hashlib
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import shapes
from metamorph_jax.data.testing import build_tiny_tokenizer

CONFIG = shapes.WorldConfig(seed=3, image_size=48, scenes=(("train", 40), ("validation", 8), ("test", 12)),
                            clips=(("train", 6), ("validation", 3), ("test", 3)), clip_frames=4)
KINDS = ("image_qa", "text_to_image", "image_to_image", "video", "video_qa", "visual_thinking")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    counts = shapes.write_world(out, CONFIG, progress=False)
    return out, counts


def read(out, split, kind):
    with open(os.path.join(out, split, f"{kind}.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name == "world.json":
                continue
            h.update(os.path.relpath(os.path.join(root, name), folder).encode())
            h.update(open(os.path.join(root, name), "rb").read())
    return h.hexdigest()


def test_deterministic(world, tmp_path):
    out, _ = world
    again = str(tmp_path / "again")
    shapes.write_world(again, CONFIG, progress=False)
    assert digest(out) == digest(again)


def test_every_kind_present_and_renders(world):
    out, counts = world
    tokenizer = build_tiny_tokenizer()
    ids = conv.add_image_tokens(tokenizer)
    generative = {"text_to_image", "image_to_image", "video", "visual_thinking"}
    for split in shapes.SPLITS:
        for kind in KINDS:
            records = read(out, split, kind)
            assert records and len(records) == counts[split][kind], (split, kind)
            for index, record in enumerate(records):
                c = conv.parse_record(record, where=f"{split}/{kind}:{index}", image_root=out)
                assert all(os.path.exists(p) for p in c.image_paths)
                sample = conv.render(c, tokenizer, ids, num_image_tokens=4)
                assert bool(sample["vision_mask"].any()) == (kind in generative)


def test_splits_are_disjoint(world):
    out, _ = world
    used = {}
    for split in shapes.SPLITS:
        keys = set()
        for kind in KINDS:
            for record in read(out, split, kind):
                paths = record.get("images") or [record["image"]] if "video" not in record else []
                if "video" in record:
                    paths = [record["video"]]
                for path in paths:
                    top, split_dir, name = path.split("/")[:3]
                    assert split_dir == split, (path, split)
                    keys.add((top, name))
        used[split] = keys
    for a, b in itertools.combinations(shapes.SPLITS, 2):
        assert not used[a] & used[b], (a, b)
    # and scene descriptions hash to their split
    for record in read(out, "test", "text_to_image"):
        assert shapes.split_of(os.path.basename(record["images"][0])[:-4]) == "test"


def test_oracle_reads_every_single_shape_scene():
    for size in (32, 64):
        for shape, colour, scale, cell in itertools.product(shapes.SHAPES, shapes.COLOURS, shapes.SIZES, range(9)):
            item = shapes.Shape(shape, colour, scale, cell)
            reading = shapes.read_shape(shapes.render_scene((item,), size))
            assert reading == shapes.Reading(colour, shape, scale, item.position), (size, item)
    assert shapes.read_shape(np.full((16, 16, 3), 255, np.uint8)) is None


def test_oracle_reads_rendered_test_images(world):
    out, _ = world
    single = [r for r in read(out, "test", "text_to_image") if len(r["target"]) == 1]
    # Single-shape test scenes are few; add every single-shape scene of the test split.
    scenes = [(shapes.Shape(*k), ) for k in itertools.product(
        shapes.SHAPES, shapes.COLOURS, shapes.SIZES, range(9))]
    scenes = [s for s in scenes if shapes.split_of(shapes.scene_key(s)) == "test"]
    assert len(scenes) > 10
    checked = 0
    for record in single:
        pixels = np.asarray(Image.open(os.path.join(out, record["images"][0])).convert("RGB"))
        target = record["target"][0]
        reading = shapes.read_shape(pixels)
        assert (reading.colour, reading.shape, reading.size, reading.position) == (
            target["colour"], target["shape"], target["size"], target["position"])
        checked += 1
    for scene in scenes:
        item = scene[0]
        assert shapes.read_shape(shapes.render_scene(scene, CONFIG.image_size)) == shapes.Reading(
            item.colour, item.shape, item.size, item.position)
        checked += 1
    assert checked == len(single) + len(scenes)


def test_command_line(tmp_path):
    shapes.main(["--out", str(tmp_path / "w"), "--train", "5", "--validation", "2", "--test", "2",
                 "--clips", "5", "--image-size", "32"])
    meta = json.load(open(tmp_path / "w" / "world.json"))
    assert meta["counts"]["train"]["image_qa"] == 5 and meta["config"]["image_size"] == 32


def test_all_kinds_through_the_pipeline(world):
    """A weighted mixture of the six kinds packs into batches without a bad record."""
    from metamorph_jax.data import pipeline as P
    out, _ = world
    tokenizer = build_tiny_tokenizer()
    ids = conv.add_image_tokens(tokenizer)
    sources = [P.Source(os.path.join(out, "train", f"{kind}.jsonl"), weight=w, image_root=out)
               for kind, w in zip(KINDS, (4, 2, 1, 1, 1, 1))]
    config = P.DataConfig(seq_len=160, batch_size=2, num_image_tokens=4, image_size=16,
                          max_images_per_row=10, num_epochs=None, shard_index=0, shard_count=1,
                          strict=True)
    iterator = P.make_iterator(sources, tokenizer, ids, config)
    batches = [next(iterator) for _ in range(12)]
    assert iterator.bad_records.total == 0
    assert sum(int(b["vision_mask"].sum()) for b in batches) > 0
    assert sum(int(b["image_valid"].sum()) for b in batches) > 12
    # first-fit filled the rows well: most positions hold a sample
    fill = np.mean([np.mean(b["segment_ids"] > 0) for b in batches])
    assert fill > 0.6, fill


def test_data_shapes_config(world):
    import importlib.util
    from metamorph_jax.data import pipeline as P
    out, _ = world
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "data_shapes.py")
    spec = importlib.util.spec_from_file_location("data_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(root=out)
    cfg.update(dict(worker_count=0, image_size=16, num_image_tokens=4, seq_len=200, batch_size=2,
                    shard_index=0, shard_count=1))
    sources, data_config = P.from_config(cfg)
    assert len(sources) == 6 and data_config.image_size == 16
    tokenizer = build_tiny_tokenizer()
    iterator = P.make_iterator(sources, tokenizer, conv.add_image_tokens(tokenizer), data_config)
    assert next(iterator)["tokens"].shape == (2, 200)
    with pytest.raises(ValueError, match="unknown data config fields"):
        P.from_config({"sources": [], "sequence_length": 3})


def test_a_clip_frame_shows_its_shape_in_the_cell_of_its_centre_none_on_a_boundary():
    item = shapes.Shape("circle", "red", "small", 0)             # top left, moving right
    # 4 frames: the centre moves 2/3 of a cell per frame: 0.5, 1.17, 1.83, 2.5 cells
    assert [s.cell for s in shapes.clip_frame_shapes(item, "right", 4)] == [0, 1, 1, 2]
    assert [s.cell for s in shapes.clip_frame_shapes(shapes.Shape("circle", "red", "small", 8),
                                                     "up", 4)] == [8, 5, 5, 2]
    # 5 frames: half a cell per frame, so frames 1 and 3 sit on cell boundaries
    shown = shapes.clip_frame_shapes(item, "right", 5)
    assert [None if s is None else s.cell for s in shown] == [0, None, 1, None, 2]
    assert all(s is None or (s.shape, s.colour, s.size) == ("circle", "red", "small")
               for s in shown)


@pytest.mark.parametrize("size", [32, 64])
def test_the_oracle_reads_every_clip_frame_s_position_and_colour_as_its_shapes_say(size):
    """Every clip the world can draw (4 frames): the oracle's position and colour of each
    frame are clip_frame_shapes'. (Shape and size of a triangle drawn at half-pixel offsets
    are the oracle's own errors, which the evaluation reports on the true frames.)"""
    starts = {"right": (0, 3, 6), "left": (2, 5, 8), "down": (0, 1, 2), "up": (6, 7, 8)}
    for shape, colour, scale, direction, lane in itertools.product(
            shapes.SHAPES, shapes.COLOURS, shapes.SIZES, shapes.DIRECTIONS, range(3)):
        item = shapes.Shape(shape, colour, scale, starts[direction][lane])   # random_clip's
        frames = shapes.clip_frames(item, direction, 4, size)
        for pixels, shown in zip(frames, shapes.clip_frame_shapes(item, direction, 4)):
            reading = shapes.read_shape(pixels)
            assert (reading.position, reading.colour) == (shown.position, colour), (
                item, direction)


def test_video_records_carry_the_shapes_of_their_predicted_frames(world):
    out, _ = world
    for split in shapes.SPLITS:
        records = read(out, split, "video")
        assert records
        for record in records:
            prompt_images = record["conversations"][0]["value"].count(conv.IMAGE_PLACEHOLDER)
            predicted = record["images"][prompt_images:]
            assert len(record["targets"]) == len(predicted) >= 1
            for path, target in zip(predicted, record["targets"]):
                (shape,) = target      # 4 frames: no centre on a boundary
                pixels = np.asarray(Image.open(os.path.join(out, path)).convert("RGB"))
                reading = shapes.read_shape(pixels)
                assert (reading.position, reading.colour) == (shape["position"], shape["colour"])
                # the clip's folder names its shape, colour and size
                assert f"{shape['shape']}{shape['colour']}{shape['size']}" in path
