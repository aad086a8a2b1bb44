"""Text loss, perplexity and vision cosine of a MetaMorph model folder over VPiT records
(eval.py --checkpoint DIR --data F.jsonl): records are rendered and packed exactly as in
training (data/pipeline.py, the model's image size and visual-token count) and scored
with training/vpit_loss.py. Text loss is the mean over response tokens; the vision
cosine is the mean cos(predicted, target visual token) over the response images' visual
positions (absent when no record has a response image).

Devices and processes: each batch is split by row over the given devices (the parameters
replicated on each). With P processes every process packs the same batches from every
record (the packing is deterministic), scores batches p, p + P, ... and the per-batch sums
are all-gathered bit for bit and added in batch order, so the totals are exactly those of
one process over the same devices per process (inference/processes.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metamorph_jax import pretrained
from metamorph_jax.data import conversation as conv
from metamorph_jax.data import pipeline
from metamorph_jax.inference.processes import gather_rows
from metamorph_jax.input_errors import BadInput
from metamorph_jax.training.vpit_loss import SUM_KEYS, vpit_loss_sums


def evaluate(model_dir, data_paths: Sequence[str], *, template: str | None = None,
             seq_len: int = 2048, batch_size: int = 8, dtype: str = "float32",
             progress: bool = True, devices: Sequence | None = None) -> dict:
    """{"text_loss", "perplexity", "vision_cosine", "text_tokens", "vision_tokens",
    "records", "bad_records", "files": {path: the same per file}}, on every process.
    devices: split each batch over them (their count must divide batch_size); None: the
    default device."""
    from tqdm import tqdm

    from metamorph_jax.inference.checkpoints import load_metamorph

    process, processes = jax.process_index(), jax.process_count()
    if devices is not None and batch_size % len(devices):
        raise BadInput(f"--batch-size {batch_size} does not split over {len(devices)} "
                       f"devices; give a multiple of {len(devices)} (or --local-devices)")
    if not data_paths:
        raise BadInput("no data files given")
    for path in data_paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"data file {path} does not exist")
    model, params, _ = load_metamorph(model_dir, dtype=dtype)
    tokenizer = pretrained.load_tokenizer(model_dir)
    ids = conv.add_image_tokens(tokenizer)
    config = model.config
    if (ids.image_start_id, ids.image_end_id) != (config.image_start_id, config.image_end_id):
        raise BadInput(f"{model_dir}: the tokenizer's <image_start>/<image_end> ids "
                       f"{ids.image_start_id}/{ids.image_end_id} are not the model's "
                       f"{config.image_start_id}/{config.image_end_id}")
    template = template or pretrained.chat_template(model_dir)
    data_config = pipeline.DataConfig(
        seq_len=seq_len, batch_size=batch_size, num_image_tokens=config.num_image_tokens,
        image_size=config.vision.image_size, template=template, num_epochs=1,
        shard_index=0, shard_count=1)
    step = jax.jit(lambda p, b: vpit_loss_sums(model, p, b))
    place = lambda batch: batch   # noqa: E731  (default device: the arrays as they are)
    if devices is not None:
        mesh = Mesh(np.asarray(list(devices)), ("rows",))
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        rows = NamedSharding(mesh, PartitionSpec("rows"))
        place = lambda batch: jax.device_put(batch, rows)   # noqa: E731
    keys = ("tokens", "positions", "segment_ids", "text_targets", "text_mask", "image_index",
            "vision_mask", "vision_target_index", "images")
    files = {}
    for path in data_paths:
        batches = pipeline.make_iterator([pipeline.Source(str(path))], tokenizer, ids, data_config)
        mine, count, records = [], 0, 0
        for batch in tqdm(batches, desc=f"eval {Path(path).name}", unit="batch",
                          disable=not progress):
            if count % processes == process:   # this process's batches: p, p + P, ...
                sums = jax.device_get(step(params, place({k: np.asarray(batch[k]) for k in keys})))
                mine.append([float(sums[key]) for key in SUM_KEYS])
            count += 1
            records += int(np.asarray(batch["segment_ids"]).max(axis=1).sum())
        batches.bad_records.report(final=True)
        per_batch = gather_rows(np.asarray(mine, np.float64).reshape(-1, len(SUM_KEYS)),
                                count, process, processes)
        totals = {key: 0.0 for key in SUM_KEYS}
        for values in per_batch:   # batch order, as one process adds them
            for key, value in zip(SUM_KEYS, values):
                totals[key] += float(value)
        files[str(path)] = _summary(totals, records, batches.bad_records.as_dict())
    totals = {key: sum(f["sums"][key] for f in files.values()) for key in SUM_KEYS}
    if totals["text_tokens"] == 0 and totals["vision_tokens"] == 0:
        raise BadInput(f"nothing to score in {list(data_paths)} (every record was unusable "
                       "or had no response)")
    bad: dict = {}
    for entry in files.values():
        for reason, found in entry["bad_records"].items():
            merged = bad.setdefault(reason, {"count": 0, "examples": []})
            merged["count"] += found["count"]
            merged["examples"] = (merged["examples"] + found["examples"])[:3]
    result = _summary(totals, sum(f["records"] for f in files.values()), bad)
    result.update(files=files, checkpoint=str(model_dir), template=template, seq_len=seq_len)
    return result


def _summary(sums: dict, records: int, bad_records: dict) -> dict:
    text_tokens, vision_tokens = int(round(sums["text_tokens"])), int(round(sums["vision_tokens"]))
    text = sums["text_loss_sum"] / text_tokens if text_tokens else float("nan")
    return {"text_loss": text, "perplexity": math.exp(text) if text_tokens else float("nan"),
            "vision_cosine": (1.0 - sums["vision_loss_sum"] / vision_tokens
                              if vision_tokens else None),
            "text_tokens": text_tokens, "vision_tokens": vision_tokens, "records": records,
            "sums": dict(sums), "bad_records": bad_records}
