"""Benchmark answers and caption images from the VPiT generator: the `generate` function
runner.evaluate takes, split across processes, and text-to-image generation.

Processes (inference/processes.py): a batch of requests is split by sample index (process
p answers rows p, p + P, ...), each process decodes its rows as one generator batch (over
the devices the generator was given, VPiTGenerator(devices=...)), and the answers are
all-gathered so every process returns the whole batch in order (only process 0 writes
files; see runner.run_benchmark's `write`). Caption images are split the same way over
the captions still to render; each process writes its own files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import tasks
from metamorph_jax.evaluation.samples import decode_image
from metamorph_jax.inference import vpit_generate as vg
from metamorph_jax.inference.processes import barrier, gather_texts, process_rows

class VPiTAnswerer:
    """generate(requests) -> raw answer texts, for runner.evaluate. Each request is one
    user turn (its `<image>` placeholders filled with its images, resized and normalised
    for the tower), rendered with the model folder's chat template."""

    def __init__(self, generator: vg.VPiTGenerator, tokenizer, template: str,
                 sampling: vg.VPiTSampling, process_index: int = 0, process_count: int = 1):
        self.generator = generator
        self.tokenizer = tokenizer
        self.template = template
        self.sampling = sampling
        self.process_index, self.process_count = process_index, process_count
        self.decode_seconds = 0.0   # time inside the generator (the benchmark reads it)

    def prompt(self, request) -> vg.VPiTPrompt:
        size = self.generator.config.vision.image_size
        pixels = [images_lib.preprocess(decode_image(image, f"{request.sample.where}, image {n}"),
                                        size) for n, image in enumerate(request.images)]
        return vg.prompt_from_turns([conv.Turn("user", request.prompt)], pixels, self.tokenizer,
                                    self.template, self.generator.config,
                                    self.generator.pad_token_id)

    def __call__(self, requests: Sequence) -> list[str]:
        import time

        rows = process_rows(len(requests), self.process_index, self.process_count)
        local = []
        if rows:
            prompts = [self.prompt(requests[row]) for row in rows]
            start = time.perf_counter()
            generations = self.generator.generate(prompts, self.sampling)
            self.decode_seconds += time.perf_counter() - start
            local = [vg.reply_text(g, self.tokenizer, self.generator.config).strip()
                     for g in generations]
        return gather_texts(local, len(requests), self.process_index, self.process_count)


def caption_prompt(caption: str, tokenizer, template: str, config,
                   placeholder_id: int = 0) -> vg.VPiTPrompt:
    """The prompt asking for an image of `caption`, worded and laid out as the training
    records' text-to-image turns (tasks.text_to_image_request; vpit_generate.image_prompt:
    it ends on the reply's prefix and `<image_start>`, so the reply is an image)."""
    return vg.image_prompt(tasks.text_to_image_request(caption), tokenizer, template, config,
                           placeholder_id)


def generate_caption_images(generator: vg.VPiTGenerator, renderer, tokenizer, template: str,
                            captions: Sequence[tuple[str, str]], out_dir, *,
                            batch_size: int = 8, progress: bool = False,
                            process_index: int = 0, process_count: int = 1) -> list[Path]:
    """One image per (id, caption), rendered to OUT_DIR/<id>.png (the id with characters
    other than letters, digits, '-', '_' and '.' replaced by '_'); images already there are
    kept, so a rerun resumes. Greedy decoding. Returns the paths in caption order and
    writes OUT_DIR/captions.json ({file name: caption}). With several processes each
    renders its share of the missing images (OUT_DIR must be one folder they all see);
    the call returns on every process once all images are written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{_safe_name(key)}.png" for key, _ in captions]
    if len(set(paths)) != len(paths):
        raise ValueError("two caption ids map to the same file name")
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    # Every process lists the folder before any writes to it, so all split the same list;
    # process p renders todo[p::P], and no two processes write the same file.
    barrier("caption images listed", process_count)
    todo = [todo[k] for k in process_rows(len(todo), process_index, process_count)]
    sampling = vg.VPiTSampling(max_new_tokens=2, max_new_images=1)
    batches = range(0, len(todo), batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="generation", unit="batch")
    for start in batches:
        rows = todo[start:start + batch_size]
        prompts = [caption_prompt(captions[i][1], tokenizer, template, generator.config,
                                  generator.pad_token_id) for i in rows]
        generations = generator.generate(prompts, sampling)
        for row, generation in zip(rows, generations):
            if len(generation.visual_tokens) != 1:
                raise RuntimeError(f"caption {captions[row][0]!r}: the generator returned "
                                   f"{len(generation.visual_tokens)} images, expected 1")
        tokens = np.concatenate([g.visual_tokens for g in generations])
        # Caption i's noise is (seed, i): the same image however the list was cut.
        renderer.save(tokens, [paths[i] for i in rows], noise_ids=rows)
    barrier("caption images written", process_count)
    if process_index == 0:
        (out_dir / "captions.json").write_text(json.dumps(
            {p.name: caption for p, (_, caption) in zip(paths, captions)}, indent=1))
    return paths


def _safe_name(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(key))
