"""The six VPiT data kinds, built as LLaVA-format records from raw sources.

Kinds (REFERENCE.md, "Data kinds"):

=================  =====================================================================
image_qa           LLaVA records passed through (validated)
video_qa           LLaVA records with a "video" frame folder passed through (validated)
text_to_image      (image, caption) -> "Generate an image of {caption}" -> image
image_to_image     (source, instruction, target) -> source + instruction -> target
video              frame folder sampled at 1 fps -> forward / reverse / reorder / next_n /
                   time_interval frame prediction (responses are images)
visual_thinking    (image, box, question, answer) -> "I will think about it visually" +
                   zoomed crop of the box, then the answer
=================  =====================================================================

Prompt wordings are drawn from lists with a seeded `numpy.random.Generator`, so a
build is reproducible.

Command line (one source in, one record file out; `.jsonl` or `.array_record`)::

    python -m metamorph_jax.data.tasks text_to_image  --input pairs.jsonl   --output t2i.jsonl
        # pairs.jsonl lines: {"image": "a.png", "caption": "a red circle"}
    python -m metamorph_jax.data.tasks image_to_image --input edits.jsonl   --output i2i.jsonl
        # lines: {"source": "a.png", "instruction": "make it blue", "target": "b.png"}
    python -m metamorph_jax.data.tasks video --input clips/ --output video.jsonl \\
        [--video-kinds forward,reverse,reorder,next_n,time_interval] [--source-fps 30] \\
        [--frames-dir frames/]
        # clips/: one frame folder per clip (frames named by timestamp, or numbered +
        # --source-fps) or video files (mp4, webm, ...: decoded with PyAV, the 1 fps
        # frames written as PNGs under --frames-dir)
    python -m metamorph_jax.data.tasks visual_thinking --input boxes.jsonl --output vt.jsonl \\
        --crop-dir crops/
        # lines: {"image": "a.png", "box": [x0, y0, x1, y1], "question": "...", "answer": "..."}
    python -m metamorph_jax.data.tasks image_qa --input llava.json --output qa.array_record

Common flags: --seed (prompt wording draw), --image-root (folder that relative image
paths in the input are relative to; without it, the working directory). Input image paths
are written as given. Paths the build writes or finds (crops, video frames) are written
relative to --image-root, or absolute without it, so that readers given the same image
root (or none: they default to the record file's folder) find them from any working
directory.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import sources

IMG = conv.IMAGE_PLACEHOLDER

KINDS = ("image_qa", "video_qa", "text_to_image", "image_to_image", "video", "visual_thinking")
VIDEO_KINDS = ("forward", "reverse", "reorder", "next_n", "time_interval")

# What the assistant says before the image in every text-to-image record. A generation
# prompt ends with it (then `<image_start>`), so a model is asked for an image exactly
# where training taught it to draw one (text_to_image_request, inference/vpit_generate's
# image_prompt).
TEXT_TO_IMAGE_RESPONSE_PREFIX = "Here is an image based on your request: "

PROMPTS = {
    "text_to_image": (
        "Generate an image of {caption}",
        "Create an image of {caption}",
        "Draw {caption}",
        "Show me a picture of {caption}",
    ),
    "text_to_image_response": (
        TEXT_TO_IMAGE_RESPONSE_PREFIX + IMG,
    ),
    "image_to_image": (
        IMG + "\n{instruction}",
        IMG + "\nEdit this image: {instruction}",
        IMG + "\nPlease {instruction}",
    ),
    "image_to_image_response": (
        "Here is the edited image: " + IMG,
        IMG,
    ),
    "forward": (
        "{frames}\nThis is the first frame of a video. Predict the next {n} frames, one per second.",
        "{frames}\nWhat happens next? Show the following {n} frames.",
    ),
    "reverse": (
        "{frames}\nThis is the last frame of a video. Predict the {n} frames before it, "
        "going backwards in time, one per second.",
        "{frames}\nShow what happened before this frame: {n} earlier frames, most recent first.",
    ),
    "reorder": (
        "{frames}\nThese {n} video frames are shuffled. Show them in the right order.",
        "{frames}\nPut these {n} frames back in temporal order.",
    ),
    "next_n": (
        "{frames}\nThese are the first {k} frames of a video. Predict the next {n} frames.",
        "{frames}\nGiven these {k} frames, show the {n} frames that follow.",
    ),
    "time_interval": (
        "{frames}\nShow this scene {t} seconds later.",
        "{frames}\nWhat does the video show after {t} seconds?",
    ),
    "visual_thinking_system": (
        "Think visually before you answer the question.",
    ),
    "visual_thinking_response": (
        "I will think about it visually. " + IMG + "\n{answer}",
    ),
}


def choose(rng: np.random.Generator, key: str, **fields) -> str:
    """Draw one wording for `key` and fill in its fields."""
    options = PROMPTS[key]
    return options[int(rng.integers(len(options)))].format(**fields)


def _record(record_id, image_paths, turns, system=None) -> dict:
    conversations = []
    if system:
        conversations.append({"from": "system", "value": system})
    for role, value in turns:
        conversations.append({"from": role, "value": value})
    record = {"id": str(record_id), "conversations": conversations}
    if image_paths:
        record["images"] = [os.fspath(p) for p in image_paths]
    return record


# --- builders (one record each) -------------------------------------------------------

def _caption_text(caption: str) -> str:
    return caption.strip().rstrip(".")


def text_to_image_request(caption: str) -> str:
    """The user turn that asks for an image of `caption` at evaluation: the first
    text-to-image wording of the training records, the caption trimmed as they trim it.
    The reply starts with TEXT_TO_IMAGE_RESPONSE_PREFIX."""
    return PROMPTS["text_to_image"][0].format(caption=_caption_text(caption))


def text_to_image(record_id, image, caption: str, rng) -> dict:
    """(image, caption) -> a text-to-image record; the image is the response. The record
    keeps the caption in its "caption" field: the image-caption pair the tower stage reads
    (data/caption_pairs.py) without parsing a prompt's wording."""
    caption = _caption_text(caption)
    record = _record(record_id, [image], [
        ("human", choose(rng, "text_to_image", caption=caption)),
        ("gpt", choose(rng, "text_to_image_response"))])
    record["caption"] = caption
    return record


def image_to_image(record_id, source, instruction: str, target, rng) -> dict:
    """(source, instruction, target) -> the edited image is the response."""
    return _record(record_id, [source, target], [
        ("human", choose(rng, "image_to_image", instruction=instruction.strip())),
        ("gpt", choose(rng, "image_to_image_response"))])


def video_task(record_id, frames: Sequence, kind: str, rng, *, context: int = 2,
               predict: int | None = None) -> dict | None:
    """Frames (already sampled at 1 fps) -> one frame-prediction record of `kind`.

    forward: first frame -> all later frames (or `predict` of them).
    reverse: last frame -> the `predict` (default all) frames before it, latest first.
    reorder: the frames (up to `predict`, default all) in a seeded shuffled order -> in order.
    next_n: the first `context` frames -> the next `predict` (default the rest).
    time_interval: first frame -> the frame t seconds later (t drawn from 1..len-1).
    Returns None when the clip is too short for the kind (needs >= 2 frames; next_n needs
    context + 1, reorder 3).
    """
    frames = [os.fspath(f) for f in frames]
    count = len(frames)
    if count < 2:
        return None

    def say(key, shown, **fields):
        return choose(rng, key, frames=IMG * len(shown), **fields)

    if kind == "forward":
        n = min(predict or count - 1, count - 1)
        shown, answer = frames[:1], frames[1:1 + n]
        prompt = say("forward", shown, n=n)
    elif kind == "reverse":
        n = min(predict or count - 1, count - 1)
        shown, answer = frames[-1:], frames[-1 - n:-1][::-1]
        prompt = say("reverse", shown, n=n)
    elif kind == "reorder":
        n = min(predict or count, count)
        if n < 3:
            return None
        answer = frames[:n]
        order = rng.permutation(n)
        while np.array_equal(order, np.arange(n)):
            order = rng.permutation(n)
        shown = [answer[i] for i in order]
        prompt = say("reorder", shown, n=n)
    elif kind == "next_n":
        if count < context + 1:
            return None
        n = min(predict or count - context, count - context)
        shown, answer = frames[:context], frames[context:context + n]
        prompt = say("next_n", shown, k=context, n=n)
    elif kind == "time_interval":
        t = int(rng.integers(1, count))
        shown, answer = frames[:1], [frames[t]]
        prompt = say("time_interval", shown, t=t)
    else:
        raise ValueError(f"unknown video kind {kind!r}; choose from {VIDEO_KINDS}")
    return _record(record_id, shown + answer, [("human", prompt), ("gpt", IMG * len(answer))])


def zoom_crop(image_path, box: Sequence[float], out_path, size: int | None = None) -> str:
    """Crop `box` (x0, y0, x1, y1 in pixels) and resize it (bicubic) to a square `size`
    (default: the source's width); write PNG to out_path and return it."""
    image = images_lib.open_image(image_path)
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
        raise ValueError(f"{image_path}: box {list(box)} lies outside the {image.width}x{image.height} image")
    size = size or image.width
    crop = image.crop((x0, y0, x1, y1)).resize((size, size), resample=3)  # 3 = bicubic
    images_lib.save_png(np.asarray(crop), out_path)
    return os.fspath(out_path)


def visual_thinking(record_id, image, crop, question: str, answer: str, rng) -> dict:
    """(image, already-written crop, question, answer) -> a visual-thinking record."""
    return _record(record_id, [image, crop], [
        ("human", IMG + "\n" + question.strip()),
        ("gpt", choose(rng, "visual_thinking_response", answer=answer.strip()))],
        system=choose(rng, "visual_thinking_system"))


# --- readers and writers ---------------------------------------------------------------

def read_records(path) -> Iterator[tuple[str, dict]]:
    """Yield ("where", record) from a source that sources.open_source reads (JSONL, a
    JSON list, ArrayRecord, tfds:...); a record that is not a JSON object -> RecordError."""
    source = sources.open_source(os.fspath(path))
    for index in range(len(source)):
        element = source[index]
        yield element["where"], conv.record_object(element["raw"], element["where"])


def write_records(records: Iterable[dict], path) -> int:
    """Write records to `.jsonl` (one JSON per line) or `.array_record` (one JSON per
    record); return the count."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    count = 0
    if sources.is_array_record(path):
        from array_record.python.array_record_module import ArrayRecordWriter
        writer = ArrayRecordWriter(path, "group_size:1")
        try:
            for record in records:
                writer.write(json.dumps(record).encode())
                count += 1
        finally:
            writer.close()
        return count
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
            count += 1
    return count


def record_path(path, image_root: str | None) -> str:
    """A file build() wrote or found (a path relative to the working directory, or
    absolute) as records hold it: relative to image_root, against which readers resolve
    it, or absolute when there is no root."""
    path = os.path.abspath(path)
    return os.path.relpath(path, os.path.abspath(image_root)) if image_root else path


def _required(record, where, fields):
    for field, kind in fields:
        if not isinstance(record.get(field), kind):
            raise conv.RecordError("bad_field", where, f'field "{field}" missing or not {kind}')


# --- whole-source builds ---------------------------------------------------------------

def build(kind: str, source, *, seed: int = 0, image_root: str | None = None,
          crop_dir: str | None = None, frames_dir: str | None = None,
          video_kinds: Sequence[str] = VIDEO_KINDS,
          source_fps: float | None = None, fps: float = 1.0, context: int = 2,
          predict: int | None = None) -> Iterator[dict]:
    """Yield the records of one raw source for `kind` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    root = image_root or ""
    join = lambda p: p if os.path.isabs(p) else os.path.join(root, p)  # noqa: E731
    if kind in ("image_qa", "video_qa"):
        for where, record in read_records(source):
            conv.parse_record(record, where=where, image_root=image_root, video_fps=fps,
                              video_source_fps=source_fps)  # validate; raises RecordError
            yield record
    elif kind == "text_to_image":
        for where, record in read_records(source):
            _required(record, where, [("image", str), ("caption", str)])
            yield text_to_image(record.get("id", where), record["image"], record["caption"], rng)
    elif kind == "image_to_image":
        for where, record in read_records(source):
            _required(record, where, [("source", str), ("instruction", str), ("target", str)])
            yield image_to_image(record.get("id", where), record["source"], record["instruction"],
                                 record["target"], rng)
    elif kind == "video":
        clips = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d))
                       or images_lib.is_video_file(d))
        for clip in clips:
            frames = images_lib.sample_frames(os.path.join(source, clip), fps=fps, source_fps=source_fps)
            if frames and not isinstance(frames[0], str):
                # A video file: its sampled frames become PNGs the records can point to.
                if frames_dir is None:
                    raise ValueError("video files among the clips need frames_dir (--frames-dir), "
                                     "where their sampled frames are written")
                clip = os.path.splitext(clip)[0]
                paths = []
                for t, pixels in enumerate(frames):
                    paths.append(os.path.join(frames_dir, clip, f"{round(t * 1000 / fps):06d}ms.png"))
                    images_lib.save_png(pixels, paths[-1])
                frames = paths
            frames = [record_path(frame, image_root) for frame in frames]
            for video_kind in video_kinds:
                record = video_task(f"{clip}-{video_kind}", frames, video_kind, rng,
                                    context=context, predict=predict)
                if record is not None:
                    yield record
    elif kind == "visual_thinking":
        if crop_dir is None:
            raise ValueError("visual_thinking needs crop_dir (where zoomed crops are written)")
        for index, (where, record) in enumerate(read_records(source)):
            _required(record, where, [("image", str), ("box", list), ("question", str), ("answer", str)])
            record_id = record.get("id", f"vt{index:08d}")
            crop = record_path(zoom_crop(join(record["image"]), record["box"],
                                         os.path.join(crop_dir, f"{record_id}.png")), image_root)
            yield visual_thinking(record_id, record["image"], crop, record["question"],
                                  record["answer"], rng)
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--input", required=True,
                        help="source file (JSONL, JSON list, .array_record, tfds:name/split) or clip folder")
    parser.add_argument("--output", required=True, help="out.jsonl or out.array_record")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--crop-dir", default=None)
    parser.add_argument("--frames-dir", default=None, help="where frames sampled from video files go")
    parser.add_argument("--video-kinds", default=",".join(VIDEO_KINDS))
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--source-fps", type=float, default=None)
    args = parser.parse_args(argv)
    records = build(args.kind, args.input, seed=args.seed, image_root=args.image_root,
                    crop_dir=args.crop_dir, frames_dir=args.frames_dir,
                    video_kinds=args.video_kinds.split(","),
                    fps=args.fps, source_fps=args.source_fps)
    count = write_records(tqdm(records, desc=f"{args.kind} records", unit="rec"), args.output)
    print(f"wrote {count} {args.kind} records to {args.output}")


if __name__ == "__main__":
    main()
