"""Builders of the six VPiT data kinds, their record files and the command line."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import sources, tasks
from metamorph_jax.data.testing import build_tiny_tokenizer

IMG = conv.IMAGE_PLACEHOLDER


def rng(seed=0):
    return np.random.default_rng(seed)


def turns(record):
    return [(t["from"], t["value"]) for t in record["conversations"]]


def check_renders(record, root="/x", expect_vision=True):
    tokenizer = build_tiny_tokenizer()
    ids = conv.add_image_tokens(tokenizer)
    c = conv.parse_record(record, where="r", image_root=root)
    out = conv.render(c, tokenizer, ids, num_image_tokens=2)
    assert bool(out["vision_mask"].any()) == expect_vision
    return c


def test_text_to_image():
    record = tasks.text_to_image("a", "t.png", "a red circle.", rng())
    (h_role, prompt), (g_role, reply) = turns(record)
    assert (h_role, g_role) == ("human", "gpt") and record["images"] == ["t.png"]
    assert prompt in [p.format(caption="a red circle") for p in tasks.PROMPTS["text_to_image"]]
    assert reply == "Here is an image based on your request: " + IMG
    assert record["caption"] == "a red circle"   # the pair, for the tower stage
    check_renders(record)


def test_image_to_image():
    record = tasks.image_to_image("b", "s.png", "make it blue", "t.png", rng())
    assert record["images"] == ["s.png", "t.png"]
    prompt, reply = turns(record)[0][1], turns(record)[1][1]
    assert prompt.startswith(IMG) and "make it blue" in prompt and reply.count(IMG) == 1
    c = check_renders(record)
    assert c.image_paths == ("/x/s.png", "/x/t.png")


FRAMES = [f"f{i}.png" for i in range(5)]


@pytest.mark.parametrize("kind, shown, answer", [
    ("forward", ["f0.png"], ["f1.png", "f2.png", "f3.png", "f4.png"]),
    ("reverse", ["f4.png"], ["f3.png", "f2.png", "f1.png", "f0.png"]),
    ("next_n", ["f0.png", "f1.png"], ["f2.png", "f3.png", "f4.png"]),
])
def test_video_kinds(kind, shown, answer):
    record = tasks.video_task("v", FRAMES, kind, rng())
    assert record["images"] == shown + answer
    (_, prompt), (_, reply) = turns(record)
    assert prompt.count(IMG) == len(shown) and reply == IMG * len(answer)
    check_renders(record)


def test_video_reorder_and_interval():
    record = tasks.video_task("v", FRAMES, "reorder", rng(3))
    shown, answer = record["images"][:5], record["images"][5:]
    assert answer == FRAMES and sorted(shown) == FRAMES and shown != FRAMES
    record = tasks.video_task("v", FRAMES, "time_interval", rng(1))
    (_, prompt), _ = turns(record)
    t = int(prompt.split(" seconds")[0].split()[-1])
    assert record["images"] == ["f0.png", FRAMES[t]]
    assert tasks.video_task("v", FRAMES[:2], "reorder", rng()) is None  # too short
    assert tasks.video_task("v", FRAMES[:1], "forward", rng()) is None


def test_wording_is_seeded():
    a = [tasks.text_to_image(i, "x.png", "c", rng(5))["conversations"][0]["value"] for i in range(3)]
    draws = np.random.default_rng(5)
    b = [tasks.text_to_image(i, "x.png", "c", draws)["conversations"][0]["value"] for i in range(30)]
    assert len(set(b)) > 1  # several wordings are drawn
    assert a == [tasks.text_to_image(i, "x.png", "c", rng(5))["conversations"][0]["value"] for i in range(3)]


def test_visual_thinking_crop(tmp_path):
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[20:40, 0:20] = (200, 10, 10)  # red bottom-left quadrant
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    crop = tasks.zoom_crop(tmp_path / "scene.png", [0, 20, 20, 40], tmp_path / "crops" / "c.png")
    zoomed = np.asarray(Image.open(crop))
    assert zoomed.shape == (40, 40, 3) and np.all(zoomed == (200, 10, 10))
    record = tasks.visual_thinking("vt", "scene.png", "crops/c.png", "what colour ?", "red", rng())
    assert record["conversations"][0]["from"] == "system"
    assert turns(record)[2][1] == "I will think about it visually. " + IMG + "\nred"
    c = check_renders(record, root=str(tmp_path))
    assert c.image_paths[1] == str(tmp_path / "crops/c.png")
    with pytest.raises(ValueError, match="outside"):
        tasks.zoom_crop(tmp_path / "scene.png", [0, 0, 50, 10], tmp_path / "bad.png")


def _load_through_pipeline(record_file, image_root=None):
    """Every record of a file through the pipeline's SampleMaker (parse, render, load)."""
    from metamorph_jax.data.pipeline import DataConfig, SampleMaker
    tokenizer = build_tiny_tokenizer()
    make = SampleMaker(tokenizer, conv.add_image_tokens(tokenizer),
                       DataConfig(seq_len=256, num_image_tokens=2, image_size=8, image_dtype="uint8"))
    source = sources.open_source(str(record_file), image_root)
    return [make(source[i]) for i in range(len(source))]


@pytest.mark.parametrize("with_root", [True, False], ids=["image_root", "no_root"])
def test_relative_crop_dir_resolves_from_anywhere(tmp_path, monkeypatch, with_root):
    """Crops written under a relative --crop-dir load when the records are read from
    another working directory (against the image root, or the record file's folder)."""
    data, work, elsewhere = tmp_path / "data", tmp_path / "work", tmp_path / "elsewhere"
    for folder in (data, work, elsewhere):
        folder.mkdir()
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[8:, :8] = (200, 10, 10)  # red bottom-left quadrant
    Image.fromarray(pixels).save(data / "scene.png")
    # without --image-root, input image paths are relative to the working directory
    image = "scene.png" if with_root else str(data / "scene.png")
    write_jsonl(data / "boxes.jsonl", [{"image": image, "box": [0, 8, 8, 16],
                                        "question": "what colour ?", "answer": "red"}])
    monkeypatch.chdir(work)
    root = ["--image-root", "../data"] if with_root else []
    tasks.main(["visual_thinking", "--input", "../data/boxes.jsonl", "--output", "../data/vt.jsonl",
                "--crop-dir", "crops"] + root)
    assert (work / "crops" / "vt00000000.png").exists()
    monkeypatch.chdir(elsewhere)
    samples = _load_through_pipeline(data / "vt.jsonl", str(data) if with_root else None)
    assert len(samples) == 1 and "bad" not in samples[0], samples[0]
    scene, crop = samples[0]["images"]
    np.testing.assert_array_equal(scene, np.asarray(Image.open(data / "scene.png").resize((8, 8), 3)))
    assert np.all(crop == (200, 10, 10))


def test_relative_video_paths_resolve_from_anywhere(tmp_path, monkeypatch):
    """Frames of a relative clip folder, and frames sampled from a video file into a
    relative --frames-dir, load when the records are read from another directory."""
    from metamorph_jax.data.testing import write_test_video
    data, work, elsewhere = tmp_path / "data", tmp_path / "work", tmp_path / "elsewhere"
    (work / "clips" / "c1").mkdir(parents=True)
    data.mkdir(), elsewhere.mkdir()
    for ms in range(0, 3001, 1000):
        Image.new("RGB", (8, 8), (ms // 20, 0, 0)).save(work / "clips" / "c1" / f"{ms:06d}ms.png")
    write_test_video(work / "clips" / "c2.mp4",
                     [np.full((8, 8, 3), 25 * i, np.uint8) for i in range(8)], fps=4)
    monkeypatch.chdir(work)
    tasks.main(["video", "--input", "clips", "--output", "../data/f.jsonl", "--frames-dir", "frames",
                "--video-kinds", "forward"])
    monkeypatch.chdir(elsewhere)
    samples = _load_through_pipeline(data / "f.jsonl")
    assert len(samples) == 2 and not any("bad" in s for s in samples), samples


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def test_command_line_all_kinds(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), (10, 200, 10)).save(tmp_path / f"{name}.png")
    write_jsonl(tmp_path / "pairs.jsonl", [{"image": "a.png", "caption": "a green square"}])
    write_jsonl(tmp_path / "edits.jsonl", [{"source": "a.png", "instruction": "x", "target": "b.png"}])
    write_jsonl(tmp_path / "boxes.jsonl", [{"image": "a.png", "box": [0, 0, 8, 8],
                                           "question": "what ?", "answer": "green"}])
    write_jsonl(tmp_path / "qa.jsonl", [{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "yo"}]}])
    clip = tmp_path / "clips" / "c1"
    clip.mkdir(parents=True)
    for ms in range(0, 3001, 500):
        Image.new("RGB", (8, 8)).save(clip / f"{ms:06d}ms.png")
    out = tmp_path / "out"
    root = ["--image-root", str(tmp_path)]
    tasks.main(["text_to_image", "--input", str(tmp_path / "pairs.jsonl"), "--output", str(out / "t.jsonl")])
    tasks.main(["image_to_image", "--input", str(tmp_path / "edits.jsonl"), "--output", str(out / "i.array_record")])
    tasks.main(["visual_thinking", "--input", str(tmp_path / "boxes.jsonl"), "--output", str(out / "v.jsonl"),
                "--crop-dir", str(out / "crops")] + root)
    tasks.main(["video", "--input", str(tmp_path / "clips"), "--output", str(out / "f.jsonl")])
    tasks.main(["image_qa", "--input", str(tmp_path / "qa.jsonl"), "--output", str(out / "q.jsonl")] + root)
    video = [json.loads(line) for line in open(out / "f.jsonl")]
    assert [r["id"] for r in video] == [f"c1-{k}" for k in tasks.VIDEO_KINDS]
    assert all(p.endswith(("000000ms.png", "001000ms.png", "002000ms.png", "003000ms.png"))
               for r in video for p in r["images"])
    array = sources.ArrayRecordSource(str(out / "i.array_record"))
    assert len(array) == 1 and json.loads(array[0]["raw"])["images"] == ["a.png", "b.png"]
    assert os.path.exists(out / "crops" / "vt00000000.png")
    write_jsonl(tmp_path / "badqa.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(conv.RecordError, match="badqa.jsonl:1"):
        tasks.main(["image_qa", "--input", str(tmp_path / "badqa.jsonl"), "--output", str(out / "z.jsonl")])


def test_denormalize_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    assert np.array_equal(images_lib.denormalize(images_lib.load_image(tmp_path / "p.png", 8)), pixels)


def test_video_files_become_frame_records(tmp_path):
    from metamorph_jax.data.testing import write_test_video
    (tmp_path / "clips").mkdir()
    write_test_video(tmp_path / "clips" / "c2.mp4", [np.full((16, 16, 3), 25 * i, np.uint8) for i in range(10)], fps=4)
    with pytest.raises(ValueError, match="frames_dir"):
        list(tasks.build("video", str(tmp_path / "clips")))
    records = list(tasks.build("video", str(tmp_path / "clips"), frames_dir=str(tmp_path / "frames")))
    assert [r["id"] for r in records] == [f"c2-{k}" for k in tasks.VIDEO_KINDS]
    written = sorted(os.listdir(tmp_path / "frames" / "c2"))
    assert written == ["000000ms.png", "001000ms.png", "002000ms.png"]
    assert records[0]["images"][0] == str(tmp_path / "frames" / "c2" / "000000ms.png")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".array_record"])
def test_builder_reads_every_source_format(tmp_path, suffix):
    """The builder reads its input through sources.open_source, the one place a file's
    format is decided, so a JSON list or an ArrayRecord file works as well as JSONL."""
    rows = [{"image": "a.png", "caption": "a red circle"}, {"image": "b.png", "caption": "two shapes"}]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        tasks.write_records(rows, path)
    records = list(tasks.build("text_to_image", str(path)))
    assert [r["images"] for r in records] == [["a.png"], ["b.png"]]
    where = {".jsonl": ":2", ".json": ":[1]", ".array_record": "#1"}[suffix]
    bad = tmp_path / f"bad{suffix}"
    if suffix == ".json":
        bad.write_text(json.dumps([rows[0], ["not", "an", "object"]]))
    else:
        tasks.write_records([rows[0], ["not", "an", "object"]], bad)
    with pytest.raises(conv.RecordError, match=f"bad{suffix}{re.escape(where)}: malformed_json"):
        list(tasks.build("text_to_image", str(bad)))
