"""Random-access record sources for the grain pipeline: JSONL, JSON, ArrayRecord, TFDS.

Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose
elements are small dicts::

    {"raw": <record: JSON bytes or a dict>, "where": "<file>:<line>", "image_root": "<dir>",
     "source": "<file>"}

`where` is what error reports print: `file:line` for JSONL (1-based line numbers),
`file:[index]` for a JSON list, `file#index` for ArrayRecord and `tfds:name/split#index`
for TFDS; `source` is the record file (or `tfds:name/split`), under which the pipeline
counts records and bad records per source. Parsing happens later, in the pipeline's
worker processes, so a malformed line is counted there like any other bad record.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np


ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")


def is_array_record(path) -> bool:
    """Whether a record file (read or written) is ArrayRecord: by its suffix."""
    return os.fspath(path).endswith(ARRAY_RECORD_SUFFIXES)


def open_source(path: str, image_root: str | None = None, **tfds_kwargs):
    """The one place a record file's format is decided: `tfds:name/split`, ArrayRecord by
    suffix, a JSON list if the file starts with "[", else JSONL."""
    path = os.fspath(path)
    if path.startswith("tfds:"):
        name, _, split = path[len("tfds:"):].partition("/")
        return TfdsSource(name, split or "train", image_root=image_root, **tfds_kwargs)
    if is_array_record(path):
        return ArrayRecordSource(path, image_root)
    with open(path, "rb") as handle:
        head = handle.read(1 << 12).lstrip()
    if head.startswith(b"["):
        return JsonListSource(path, image_root)
    return JsonlSource(path, image_root)


def _default_root(path: str, image_root: str | None) -> str:
    return image_root if image_root is not None else os.path.dirname(os.path.abspath(path))


class JsonlSource:
    """One record per non-empty line; lines are found once by scanning for newlines."""

    def __init__(self, path: str, image_root: str | None = None):
        self.path = os.fspath(path)
        self.image_root = _default_root(self.path, image_root)
        data = np.fromfile(self.path, dtype=np.uint8)
        ends = np.flatnonzero(data == ord("\n"))
        if len(data) and (not len(ends) or ends[-1] != len(data) - 1):
            ends = np.append(ends, len(data))  # last line without a newline
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
        # Blank (whitespace-only) lines are not records: count non-space bytes per line.
        solid = np.concatenate([[0], np.cumsum(~np.isin(data, (9, 10, 13, 32)))])
        keep = solid[ends] - solid[starts] > 0
        self._starts = starts[keep]
        self._ends = ends[keep].astype(np.int64)
        self._lines = (np.flatnonzero(keep) + 1).astype(np.int64)
        self._handle = None
        self._pid = None

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> dict:
        if self._handle is None or self._pid != os.getpid():
            self._handle = os.open(self.path, os.O_RDONLY)  # one descriptor per process
            self._pid = os.getpid()
        start, end = int(self._starts[index]), int(self._ends[index])
        # pread has no shared file position, so grain's reader threads can share the fd.
        raw = os.pread(self._handle, end - start, start)
        return {"raw": raw, "where": f"{self.path}:{int(self._lines[index])}",
                "image_root": self.image_root, "source": self.path}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def __del__(self):
        if getattr(self, "_handle", None) is not None and self._pid == os.getpid():
            os.close(self._handle)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"


class JsonListSource:
    """A JSON file holding one list of records (the LLaVA .json layout)."""

    def __init__(self, path: str, image_root: str | None = None):
        from metamorph_jax.data.conversation import RecordError
        self.path = os.fspath(path)
        self.image_root = _default_root(self.path, image_root)
        with open(self.path, "rb") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                # The whole file is one JSON value: nothing in it can be used.
                raise RecordError("malformed_json", f"{self.path}:{error.lineno}", str(error)) from None
        if not isinstance(data, list):
            raise RecordError("malformed_json", self.path, "a .json source must hold a list of records")
        self._records = [json.dumps(r).encode() for r in data]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return {"raw": self._records[index], "where": f"{self.path}:[{index}]",
                "image_root": self.image_root, "source": self.path}

    def __repr__(self) -> str:
        return f"JsonListSource({self.path!r}, {len(self)} records)"


class ArrayRecordSource:
    """ArrayRecord file(s) holding one JSON record per entry (see tasks.write_records)."""

    def __init__(self, path: str, image_root: str | None = None):
        import grain
        self.path = os.fspath(path)
        self.image_root = _default_root(self.path, image_root)
        self._source = grain.sources.ArrayRecordDataSource([self.path])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return {"raw": self._source[index], "where": f"{self.path}#{index}",
                "image_root": self.image_root, "source": self.path}

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r}, {len(self)} records)"


def tfds_to_record(example: dict) -> Any:
    """Default TFDS element -> record dict.

    A feature "record" (or "json") holds the record's JSON text; without one the element
    itself is the record (bytes decoded to str). uint8 image arrays in features "image" /
    "images" are used as the record's pixels when the JSON names no images.
    """
    record = None
    for key in ("record", "json"):
        if key in example:
            value = example[key]
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                return text  # reported as malformed_json by the pipeline
            break
    if record is None:
        record = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}
    if isinstance(record, dict):
        for key in ("image", "images"):
            if key in example and not any(k in record for k in ("image", "images", "video")):
                value = example[key]
                record[key] = list(value) if key == "images" else value
    return record


class TfdsSource:
    """A TFDS data source (`tfds.data_source`, array_record file format) as records."""

    def __init__(self, name: str, split: str = "train", *, data_dir: str | None = None,
                 image_root: str | None = None, to_record: Callable[[dict], Any] = tfds_to_record):
        import tensorflow_datasets as tfds
        self.name, self.split = name, split
        self.image_root = image_root or ""
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        self._to_record = to_record

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return {"raw": self._to_record(self._source[index]),
                "where": f"tfds:{self.name}/{self.split}#{index}", "image_root": self.image_root,
                "source": f"tfds:{self.name}/{self.split}"}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, {len(self)} records)"
