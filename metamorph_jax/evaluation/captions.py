"""Caption files for text-to-image evaluation (COCO-30K style): JSONL, one object a line
with a "caption" and an optional "id" (or "image_id"); or a TSV with a header row naming a
"caption" column and optionally an "id" / "image_id" column. Without ids, the line number
is the id. Returns [(id, caption)] in file order."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from metamorph_jax.evaluation.samples import BenchmarkFileError

_ID_FIELDS = ("id", "image_id")


def _pick_id(record: dict, number: int) -> str:
    for field in _ID_FIELDS:
        if record.get(field) not in (None, ""):
            return str(record[field])
    return str(number)


def read_captions(path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(path, None, None, "file does not exist")
    out, seen = [], set()

    def add(row, record):
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BenchmarkFileError(path, row, "caption", "missing or empty caption")
        key = _pick_id(record, row)
        if key in seen:
            raise BenchmarkFileError(path, row, "id", f"duplicate id {key!r}")
        seen.add(key)
        out.append((key, caption.strip()))

    if path.suffix.lower() in (".tsv", ".csv"):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if not reader.fieldnames or "caption" not in reader.fieldnames:
                raise BenchmarkFileError(path, 1, "caption", f"header {reader.fieldnames} has no "
                                         "'caption' column")
            for row, record in enumerate(reader, start=2):
                add(row, record)
    else:
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
                add(row, record)
    if not out:
        raise BenchmarkFileError(path, None, None, "no captions")
    return out
