"""Benchmark file readers: each returns (samples, skipped), where `skipped` counts rows a
benchmark's own rule leaves out ({reason: count}); every other problem raises
BenchmarkFileError naming the file, the row and the field.

Formats (one published layout per benchmark):

* VLMEvalKit TSV (the files VLMEvalKit downloads as MMBench_DEV_EN.tsv, SEEDBench_IMG.tsv,
  ScienceQA_TEST.tsv, MMMU_DEV_VAL.tsv, RealWorldQA.tsv, VStarBench.tsv, MMVP.tsv,
  TextVQA_VAL.tsv, ChartQA_TEST.tsv): a tab-separated file with a header row; columns
  `index`, `question`, `answer`, option columns `A`, `B`, ... (empty = absent), optional
  `hint`, `category`, `split`; images in `image` as base64 (a list literal of base64
  strings for multi-image rows; a short value is the `index` of another row whose image it
  shares, as MMBench's rotated copies do) or as paths in `image_path` (relative to the
  file's folder). TextVQA's `answer` holds the list of ten human answers as a list literal.
* MV-Bench (the OpenGVLab/MVBench dataset folder): `json/<task>.json`, each a list of
  {video, question, candidates, answer (the correct candidate's text), start?, end?};
  videos under `video/<task's source folder>/` as MV-Bench's task table lists them.
* Generic JSONL: one object a line, {id, image | images | video, question, choices?,
  answer, category?}; `choices` a list (lettered A, B, ...) or a {letter: text} object;
  with choices, `answer` is a letter.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import os
import string
import sys
from collections import Counter
from pathlib import Path

from metamorph_jax.evaluation.samples import BenchmarkFileError, Sample

LETTERS = string.ascii_uppercase
_INDEX_REFERENCE_MAX = 64  # VLMEvalKit: an `image` value this short names another row's index
_MISSING = ("", "nan", "NaN", "None")

# MV-Bench's task table: task -> (question file, video folder under video/, kind, has bounds)
MVBENCH_TASKS = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", "video", False),
    "Action Count": ("action_count.json", "perception/videos", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", "video", False),
    "State Change": ("state_change.json", "perception/videos", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", "video", False),
    "Character Order": ("character_order.json", "perception/videos", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", "video", False),
}
MVBENCH_FRAME_FPS = 3.0  # tvqa/frames_fps3_hq: numbered frames at 3 fps


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in _MISSING)


# --- VLMEvalKit TSV ------------------------------------------------------------------------

def _tsv_rows(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (row number, {column: value}) of a TSV; row numbers count the header as 1."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    if not path.is_file():
        raise BenchmarkFileError(path, None, None, "file does not exist")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise BenchmarkFileError(path, None, None, "empty file (expected a VLMEvalKit TSV)") from None
        except (csv.Error, UnicodeDecodeError) as error:
            raise BenchmarkFileError(path, 1, None, f"not a TSV ({error})") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise BenchmarkFileError(path, 1, missing[0], f"header lacks column(s) {missing}: not a "
                                     f"VLMEvalKit TSV (header: {header[:12]})")
        rows = []
        row_number = 1
        try:
            for fields in reader:
                row_number = reader.line_num
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise BenchmarkFileError(path, row_number, None,
                                             f"{len(fields)} fields, header has {len(header)}")
                rows.append((row_number, dict(zip(header, fields))))
        except (csv.Error, UnicodeDecodeError) as error:
            raise BenchmarkFileError(path, row_number + 1, None, f"unparsable row ({error})") from None
    return header, rows


def _literal_list(value: str, path, row, field) -> list:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise BenchmarkFileError(path, row, field, "expected a list literal") from None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise BenchmarkFileError(path, row, field, "expected a list of strings")
    return parsed


def _b64(value: str, path, row, field) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BenchmarkFileError(path, row, field, f"not valid base64 ({error})") from None


def _tsv_images(rows, path: Path, header) -> dict:
    """index -> list of images (bytes or paths) for every row, references resolved."""
    if "image" not in header and "image_path" not in header:
        raise BenchmarkFileError(path, 1, "image", "no `image` (base64) or `image_path` column")
    raw = {}
    for row, values in rows:
        raw[values["index"]] = (row, values)
    out, decoded = {}, {}
    for index, (row, values) in raw.items():
        value = values.get("image", "")
        if "image" in header and not _missing(value):
            source = index
            if len(value) <= _INDEX_REFERENCE_MAX:
                if value not in raw or len(raw[value][1].get("image", "")) <= _INDEX_REFERENCE_MAX:
                    raise BenchmarkFileError(path, row, "image", f"{value!r} is neither base64 image "
                                             "data nor the index of a row holding an image")
                source = value
                row, value = raw[value][0], raw[value][1]["image"]
            if source not in decoded:  # rotated copies share their original's bytes
                items = _literal_list(value, path, row, "image") if value.startswith("[") else [value]
                decoded[source] = [_b64(v, path, row, "image") for v in items]
            out[index] = decoded[source]
        elif "image_path" in header and not _missing(values.get("image_path")):
            paths = values["image_path"]
            items = _literal_list(paths, path, row, "image_path") if paths.startswith("[") else [paths]
            out[index] = [p if os.path.isabs(p) else str(path.parent / p) for p in items]
        else:
            out[index] = []
    return out


def _options(values: dict) -> dict:
    return {letter: values[letter].strip() for letter in LETTERS
            if letter in values and not _missing(values[letter])}


def _check_letter(answer: str, choices: dict, path, row) -> str:
    answer = answer.strip()
    if answer not in choices:
        raise BenchmarkFileError(path, row, "answer", f"answer {answer!r} is not one of the "
                                 f"options {list(choices)}")
    return answer


def read_vlmevalkit_tsv(path, benchmark: str) -> tuple[list[Sample], dict]:
    """Read one of the VLMEvalKit benchmark TSVs; `benchmark` picks the per-benchmark rules
    (see benchmarks.py for the names)."""
    path = Path(path)
    header, rows = _tsv_rows(path, ("index", "question", "answer"))
    images = _tsv_images(rows, path, header)
    seen = set()
    samples, skipped = [], Counter()
    short_answer = benchmark in ("textvqa", "chartqa")
    for row, values in rows:
        index = values["index"].strip()
        if index in seen:
            raise BenchmarkFileError(path, row, "index", f"duplicate index {index!r}")
        seen.add(index)
        if _missing(values["question"]):
            raise BenchmarkFileError(path, row, "question", "empty question")
        if benchmark == "mmmu" and not _missing(values.get("split")) \
                and values["split"].strip() != "validation":
            skipped["not_validation_split"] += 1  # MMMU_DEV_VAL also holds the dev split
            continue
        sample_images = images[index]
        if not sample_images:
            if benchmark == "scienceqa":
                skipped["no_image"] += 1  # ScienceQA-IMG: the questions that have an image
                continue
            raise BenchmarkFileError(path, row, "image", "row has no image")
        choices = {} if short_answer else _options(values)
        if short_answer:
            answer = values["answer"]
            if benchmark == "textvqa":
                answer = _literal_list(answer, path, row, "answer") if answer.startswith("[") else [answer]
            if _missing(answer) or answer == []:
                raise BenchmarkFileError(path, row, "answer", "empty answer")
        else:
            if not choices:
                if benchmark == "mmmu":
                    skipped["open_question"] += 1  # the multiple-choice part of MMMU only
                    continue
                raise BenchmarkFileError(path, row, "A", "no options (columns A, B, ... are empty)")
            answer = _check_letter(values["answer"], choices, path, row)
        group = None
        if benchmark in ("mmbench", "mmvp"):
            try:
                number = int(index)
            except ValueError:
                raise BenchmarkFileError(path, row, "index", f"{index!r} is not an integer") from None
            # MMBench: rotated copies share index % 1e6. MMVP: indices 2k+1 and 2k+2 (from 1)
            # ask about the two images of one pair.
            group = str(number % 1_000_000) if benchmark == "mmbench" else str((number - 1) // 2)
        category = None if _missing(values.get("category")) else values["category"].strip()
        hint = None if _missing(values.get("hint")) else values["hint"].strip()
        samples.append(Sample(id=index, question=values["question"].strip(), answer=answer,
                              images=sample_images, choices=choices, category=category, hint=hint,
                              group=group, where=f"{path}, row {row}"))
    if benchmark == "mmvp":
        sizes = Counter(s.group for s in samples)
        odd = [s for s in samples if sizes[s.group] != 2]
        if odd:
            raise BenchmarkFileError(path, odd[0].where.rsplit("row ", 1)[1], "index",
                                     f"index {odd[0].id} has no pair partner (MMVP pairs indices "
                                     "2k+1 and 2k+2)")
    if not samples:
        raise BenchmarkFileError(path, None, None, "no usable rows")
    return samples, dict(skipped)


# --- MV-Bench ------------------------------------------------------------------------------

def read_mvbench(root, tasks: list[str] | None = None) -> tuple[list[Sample], dict]:
    """Read the MV-Bench folder (json/ + video/); `tasks` limits to some task names."""
    root = Path(root)
    if not (root / "json").is_dir():
        raise BenchmarkFileError(root, None, None, "not an MV-Bench folder (no json/ folder)")
    unknown = set(tasks or ()) - set(MVBENCH_TASKS)
    if unknown:
        raise ValueError(f"unknown MV-Bench tasks {sorted(unknown)}; known: {list(MVBENCH_TASKS)}")
    samples = []
    for task, (file_name, folder, kind, bounded) in MVBENCH_TASKS.items():
        if tasks and task not in tasks:
            continue
        path = root / "json" / file_name
        if not path.is_file():
            raise BenchmarkFileError(path, None, None, f"question file of task {task!r} is missing")
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BenchmarkFileError(path, None, None, f"not JSON ({error})") from None
        if not isinstance(entries, list):
            raise BenchmarkFileError(path, None, None, "expected a JSON list of questions")
        for number, entry in enumerate(entries):
            for field in ("video", "question", "candidates", "answer"):
                if not isinstance(entry, dict) or field not in entry:
                    raise BenchmarkFileError(path, number, field, "missing field")
            candidates = entry["candidates"]
            if not isinstance(candidates, list) or not candidates:
                raise BenchmarkFileError(path, number, "candidates", "expected a non-empty list")
            choices = {LETTERS[i]: str(c) for i, c in enumerate(candidates)}
            matches = [k for k, v in choices.items() if v == str(entry["answer"])]
            if len(matches) != 1:
                raise BenchmarkFileError(path, number, "answer", f"{entry['answer']!r} matches "
                                         f"{len(matches)} of the candidates {candidates}")
            extra = {"kind": kind}
            if kind == "frame":
                extra["source_fps"] = MVBENCH_FRAME_FPS
            if bounded and "start" in entry and "end" in entry:
                extra["bound"] = (float(entry["start"]), float(entry["end"]))
            samples.append(Sample(id=f"{file_name[:-5]}/{number}", question=str(entry["question"]),
                                  answer=matches[0], video=str(root / "video" / folder / entry["video"]),
                                  choices=choices, category=task, where=f"{path}, entry {number}",
                                  extra=extra))
    return samples, {}


# --- generic JSONL -------------------------------------------------------------------------

def read_jsonl(path) -> tuple[list[Sample], dict]:
    """Read the generic {id, image | images | video, question, choices?, answer} JSONL."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(path, None, None, "file does not exist")
    samples, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for row, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkFileError(path, row, None, f"not JSON ({error})") from None
            if not isinstance(record, dict):
                raise BenchmarkFileError(path, row, None, "a line must be a JSON object")
            for field in ("id", "question", "answer"):
                if field not in record:
                    raise BenchmarkFileError(path, row, field, "missing field")
            sample_id = str(record["id"])
            if sample_id in seen:
                raise BenchmarkFileError(path, row, "id", f"duplicate id {sample_id!r}")
            seen.add(sample_id)
            keys = [k for k in ("image", "images", "video") if record.get(k) is not None]
            if len(keys) > 1:
                raise BenchmarkFileError(path, row, keys[1], f"give only one of {keys}")

            def resolve(p, field):
                if not isinstance(p, str):
                    raise BenchmarkFileError(path, row, field, "expected a path string")
                return p if os.path.isabs(p) else str(path.parent / p)

            images, video = [], None
            if keys == ["image"]:
                images = [resolve(record["image"], "image")]
            elif keys == ["images"]:
                if not isinstance(record["images"], list):
                    raise BenchmarkFileError(path, row, "images", "expected a list of paths")
                images = [resolve(p, "images") for p in record["images"]]
            elif keys == ["video"]:
                video = resolve(record["video"], "video")
            raw = record.get("choices")
            if raw is None:
                choices = {}
            elif isinstance(raw, list):
                choices = {LETTERS[i]: str(c) for i, c in enumerate(raw)}
            elif isinstance(raw, dict) and all(k in LETTERS for k in raw):
                choices = {k: str(raw[k]) for k in sorted(raw)}
            else:
                raise BenchmarkFileError(path, row, "choices", "expected a list or a {letter: text} object")
            answer = record["answer"]
            if choices:
                answer = _check_letter(str(answer), choices, path, row)
            elif not isinstance(answer, (str, list)) or not answer:
                raise BenchmarkFileError(path, row, "answer", "expected a string or a list of strings")
            samples.append(Sample(id=sample_id, question=str(record["question"]), answer=answer,
                                  images=images, video=video, choices=choices,
                                  category=record.get("category"), where=f"{path}, row {row}"))
    if not samples:
        raise BenchmarkFileError(path, None, None, "no samples")
    return samples, {}
