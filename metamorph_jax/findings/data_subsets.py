"""The findings' data amounts: subset files of the world's train split.

A run that trains on N records of a kind reads OUT/data/<kind>-<end><N>.jsonl, the first
(`head`) or last (`tail`) N records of WORLD/train/<kind>.jsonl. Generation records come
from the head and every other kind from the tail, so that as long as the amounts of a run
fit the split together its generation and understanding records show different scenes
(one scene gives one record of each scene kind). Records are copied unchanged; their
image paths stay relative to the world, which the run's sources name as image root.
"""
from __future__ import annotations

import os
from pathlib import Path

from metamorph_jax.findings.scales import GENERATION
from metamorph_jax.input_errors import BadInput


def end_of(kind: str) -> str:
    return "head" if kind == GENERATION else "tail"


def subset_path(out: Path, kind: str, count: int) -> Path:
    return Path(out) / "data" / f"{kind}-{end_of(kind)}{count}.jsonl"


def write_subset(world: Path, out: Path, kind: str, count: int) -> Path:
    """OUT/data/<kind>-<end><count>.jsonl (kept when it exists); an error naming the source
    file when it holds fewer than `count` records."""
    target = subset_path(out, kind, count)
    if target.exists():
        return target
    source = Path(world) / "train" / f"{kind}.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist (is the Shapes world written?)")
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    if count < 1 or count > len(lines):
        raise BadInput(f"{source} holds {len(lines)} records; a finding asks for {count} "
                       f"(make the world larger: the scale's assets fields train / clips)")
    chosen = lines[:count] if end_of(kind) == "head" else lines[-count:]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial{os.getpid()}")
    partial.write_text("\n".join(chosen) + "\n")
    partial.replace(target)
    return target


def write_subsets(world: Path, out: Path, records: dict) -> dict:
    """{kind: subset file} for {kind: count}."""
    return {kind: write_subset(world, out, kind, count) for kind, count in records.items()}


def count_records(path: Path) -> int:
    return sum(1 for line in Path(path).read_text().splitlines() if line.strip())
