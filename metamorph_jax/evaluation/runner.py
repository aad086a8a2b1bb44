"""Running a benchmark through a model-agnostic `generate` function, and scoring a
predictions file without a model.

`generate(requests) -> list[str]` receives a batch of `Request`s (prompt text with one
`<image>` per image, the images as paths / encoded bytes / uint8 arrays in placeholder
order) and returns one raw answer each; eval.py wires it onto the VPiT generator with the
model folder's chat template. Video samples arrive with their frames already picked
(1 fps by default, as the training data kinds pick them) and one `<image>` per frame.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from metamorph_jax.data.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from metamorph_jax.evaluation import benchmarks, prompts, results, scoring
from metamorph_jax.evaluation.predictions import PredictionsWriter, predictions_path, read_predictions
from metamorph_jax.evaluation.samples import Sample, sample_video_frames
from metamorph_jax.input_errors import BadInput


@dataclasses.dataclass
class Request:
    id: str
    prompt: str
    images: list
    sample: Sample


GenerateFn = Callable[[Sequence[Request]], Sequence[str]]


def video_frames(sample: Sample, fps: float = 1.0, max_frames: int | None = None) -> list:
    """Frames of a video sample at `fps`; MV-Bench's [start, end] bounds (seconds) keep the
    frames whose sampling time k / fps (from the first frame) falls inside them, or, for an
    interval shorter than the sampling step, the frame nearest its middle."""
    frames = sample_video_frames(sample, fps=fps, source_fps=sample.extra.get("source_fps"))
    if "bound" in sample.extra:
        start, end = sample.extra["bound"]
        inside = [f for k, f in enumerate(frames) if start - 1e-9 <= k / fps <= end + 1e-9]
        if not inside:
            nearest = min(len(frames) - 1, max(0, round((start + end) / 2 * fps)))
            inside = [frames[nearest]]
        frames = inside
    if max_frames is not None and len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames


def make_request(benchmark: str, sample: Sample, fps: float = 1.0,
                 max_frames: int | None = None) -> Request:
    text, images = prompts.build_prompt(benchmark, sample)
    if sample.video is not None:
        images = video_frames(sample, fps, max_frames)
        text = text.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER * len(images), 1)
    return Request(sample.id, text, images, sample)


def run_benchmark(benchmark: str, samples: list[Sample], generate: GenerateFn, out_dir, *,
                  batch_size: int = 8, skipped: dict | None = None, video_fps: float = 1.0,
                  max_video_frames: int | None = None, progress: bool = False,
                  write: bool = True) -> dict | None:
    """Answer every sample not yet in OUT/predictions/<benchmark>.jsonl, writing each line as
    its batch finishes, then score the whole file.

    write=False (every process but the first of a multi-process run): the same samples are
    answered (`generate` gathers the answers across processes) but nothing is written and
    None is returned; OUT must be the same shared folder for every process."""
    path = predictions_path(out_dir, benchmark)
    done = read_predictions(path)[0] if not write else None
    with (PredictionsWriter(path) if write else _NoWriter(done)) as writer:
        todo = [s for s in samples if not writer.done(s.id)]
        batches = range(0, len(todo), batch_size)
        if progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc=benchmark, unit="batch")
        for start in batches:
            batch = [make_request(benchmark, s, video_fps, max_video_frames)
                     for s in todo[start:start + batch_size]]
            answers = list(generate(batch))
            if len(answers) != len(batch):
                raise ValueError(f"generate returned {len(answers)} answers for {len(batch)} requests")
            for request, raw in zip(batch, answers):
                rule = scoring.rule_for(benchmark, request.sample)
                extracted, score = scoring.score_sample(rule, request.sample, raw)
                writer.write({"id": request.id, "prompt": request.prompt, "raw_answer": str(raw),
                              "extracted": extracted, "score": score})
    if not write:
        return None
    return score_predictions(benchmark, samples, path, skipped=skipped)


class _NoWriter:
    """The resume bookkeeping of a PredictionsWriter without the file."""

    def __init__(self, records: dict):
        self.records = dict(records)

    def done(self, sample_id: str) -> bool:
        return sample_id in self.records

    def write(self, record: dict) -> None:
        self.records[record["id"]] = record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def score_predictions(benchmark: str, samples: list[Sample], path, *, skipped: dict | None = None,
                      allow_missing: bool = False) -> dict:
    """Score an existing predictions file against the benchmark's samples, re-extracting each
    answer from its raw text (so the current rules apply). Samples without a prediction are
    an error, or with `allow_missing` score 0 and are counted in "missing_predictions".
    Answers no option could be extracted from are "unparsed": MMMU's get its harness's
    seeded random option (scoring.UnparsedGuesser, drawn in sample order), others score 0.
    (The per-line "extracted"/"score" of a predictions file are before that guess.)"""
    records, partial = read_predictions(path)
    known = {s.id for s in samples}
    unknown = [i for i in records if i not in known]
    if unknown:
        raise BadInput(f"{path}: {len(unknown)} predictions name ids the benchmark file does "
                       f"not have (first: {unknown[:3]}); wrong benchmark file?")
    scored, missing = {}, 0
    guess = scoring.UnparsedGuesser(benchmark)
    for sample in samples:
        if sample.id not in records:
            missing += 1
            scored[sample.id] = {"extracted": None, "score": 0.0, "missing": True}
            continue
        rule = scoring.rule_for(benchmark, sample)
        extracted, score = scoring.score_sample(rule, sample, records[sample.id]["raw_answer"])
        scored[sample.id] = {"extracted": extracted, "score": score}
        if sample.choices and extracted is None:
            letter = guess(sample)   # MMMU's random option; elsewhere None (scored 0)
            scored[sample.id] = {"extracted": letter, "unparsed": True,
                                 "score": float(letter is not None and letter == sample.answer)}
    if missing and not allow_missing:
        raise BadInput(f"{path}: {missing} of {len(samples)} samples have no prediction"
                       + (f" (a partial last line of {partial} bytes was ignored)" if partial else ""))
    return results.aggregate(benchmark, samples, scored, skipped=skipped, missing=missing)


def limit_samples(benchmark: str, samples: list[Sample], limit: int) -> list[Sample]:
    """The first `limit` samples in file order; for MMBench, whose score is over question
    groups (circular evaluation), the first `limit` questions with every rotation of each
    (the rotations sit further down the file), so a limited run scores whole groups."""
    if benchmark != "mmbench":
        return samples[:limit]
    kept: list = []
    for sample in samples:
        if sample.group not in kept and len(kept) < limit:
            kept.append(sample.group)
    kept_groups = set(kept)
    return [sample for sample in samples if sample.group in kept_groups]


def evaluate(files: dict, out_dir, *, generate: GenerateFn | None = None, predictions_dir=None,
             allow_missing: bool = False, limit: int | None = None, write: bool = True,
             **run_kwargs) -> dict | None:
    """{benchmark: data path} -> summary of every benchmark and their average, written to
    OUT/results.json. With `generate`, answers are produced (resuming OUT/predictions);
    with `predictions_dir` instead, its <benchmark>.jsonl files are scored as they are.
    limit: only the first N samples of each benchmark (in file order) are answered and
    scored; MMBench's first N questions with all their rotations (limit_samples).
    write=False: see run_benchmark (returns None, writes nothing)."""
    if (generate is None) == (predictions_dir is None):
        raise ValueError("give either generate (run a model) or predictions_dir (score existing)")
    per_benchmark = {}
    for benchmark, path in files.items():
        samples, skipped = benchmarks.read(benchmark, path)
        if limit is not None:
            samples = limit_samples(benchmark, samples, limit)
        if generate is not None:
            per_benchmark[benchmark] = run_benchmark(benchmark, samples, generate, out_dir,
                                                     skipped=skipped, write=write, **run_kwargs)
        else:
            source = Path(predictions_dir) / f"{benchmark}.jsonl"
            if not source.exists():
                raise FileNotFoundError(f"no predictions file {source} for benchmark {benchmark}")
            per_benchmark[benchmark] = score_predictions(benchmark, samples, source, skipped=skipped,
                                                         allow_missing=allow_missing)
    if not write:
        return None
    summary = results.summarize(per_benchmark)
    if limit is not None:
        summary["limit"] = limit
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / "results.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary
