"""Predictions files: OUT/predictions/<benchmark>.jsonl, one JSON object a line:
{"id", "prompt", "raw_answer", "extracted", "score"}.

Written line by line and flushed, so a killed run loses at most the line being written.
Opening an existing file resumes it: complete lines are kept (their ids are skipped by the
runner) and a last line cut short by the kill (no newline, or not JSON) is truncated away
and reported. A broken line anywhere else is an error naming the file and the line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from metamorph_jax.input_errors import BadInput

FIELDS = ("id", "prompt", "raw_answer", "extracted", "score")


def predictions_path(out_dir, benchmark: str) -> Path:
    return Path(out_dir) / "predictions" / f"{benchmark}.jsonl"


def read_predictions(path, *, repair: bool = False) -> tuple[dict, int]:
    """{id: record} of a predictions file, and the number of bytes of a partial last line
    (cut off when `repair`; otherwise left and ignored)."""
    path = Path(path)
    records: dict = {}
    if not path.exists():
        return records, 0
    data = path.read_bytes()
    good_end = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if last and not line:
            break  # the file ends with a newline
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or any(f not in record for f in FIELDS):
                raise BadInput(f"a line needs the fields {FIELDS}")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
            if last:
                break  # the line a killed run was writing
            raise BadInput(f"{path}, line {number}: broken predictions line ({error})") from None
        if last:
            break  # complete JSON but no newline: still the interrupted write; redo it
        if record["id"] in records:
            raise BadInput(f"{path}, line {number}: id {record['id']!r} written twice")
        records[record["id"]] = record
        good_end += len(line) + 1
    partial = len(data) - good_end
    if partial and repair:
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
    return records, partial


class PredictionsWriter:
    """Append-only writer that resumes an existing file (see the module doc)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records, self.repaired_bytes = read_predictions(self.path, repair=True)
        self._handle = open(self.path, "a", encoding="utf-8")

    def done(self, sample_id: str) -> bool:
        return sample_id in self.records

    def write(self, record: dict) -> None:
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise ValueError(f"prediction lacks fields {missing}")
        if record["id"] in self.records:
            raise ValueError(f"{self.path}: id {record['id']!r} already written")
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records[record["id"]] = record

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
