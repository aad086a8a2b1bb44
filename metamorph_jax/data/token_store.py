"""A store of precomputed visual tokens: the frozen SigLIP tower's tokens of each image file.

SigLIP is frozen in every stage, so an image's V tokens of width C can be computed once
(`python -m metamorph_jax.data.encode`) and read by the pipeline instead of its pixels
(DataConfig.visual_tokens). This module is the format, its reader and its part writer;
it runs no model (the encoder is inference/token_encoder.py).

A store is a folder (by convention named `TOKENS.array_record`):

    encode.json                      the settings it is being written with (dtype, [V, C],
                                     image_size, the tower's config and folder); a rerun
                                     with other settings is refused
    part-PPPPP-CCCCCC.array_record   ArrayRecord, one entry per image: the [V, C] tokens as
                                     raw little-endian bytes of `dtype`, C order
                                     (PPPPP: the writing process, CCCCCC: its part number)
    part-PPPPP-CCCCCC.keys.json      that part's keys in entry order, written (atomically)
                                     after the part is closed: a part without it was cut off
                                     and is deleted and redone on the next run
    index.json                       written last, when every image has tokens: the
                                     settings plus the list of parts; without it the store
                                     is incomplete and the reader refuses it

The key of an image is its absolute, normalised path (with "/" separators): the record's
path joined to its source's image root, made absolute. Keys relative to the image root
(version 1) collided: two record files under different roots that both name `img/1.jpg`
shared the first one's tokens. An absolute path names one file, costs no file read to
compute (the pipeline reads tokens without touching the image), and every record that
refers to a file, in whatever record file, finds the same tokens. A content hash would
also be unambiguous, but the pipeline would have to read every image file to find its
key. The price: a store is tied to where its images are; images moved to another folder
have no tokens there (an error naming the record) and are re-encoded. One way remains for
a normalised path to name two files: a symlinked folder followed by "..", which the OS
resolves through the link and normalisation does not; the encoder compares each key's
files by their real paths and refuses such a pair, naming both records and both paths.
Video frame folders give one key per sampled frame file. Images given as arrays (TFDS
pixels, frames decoded from a video file) have no path and cannot be stored; both the
encoder and the pipeline say so, naming the record. A store of version 1 is refused
with a message saying to re-encode it.

dtype: "bfloat16" (default; 2 bytes per value), "float16" or "float32". The tokens are
L2-normalised, so every value is in [-1, 1] and float16's range is never exceeded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from metamorph_jax.input_errors import InputError

FORMAT = "metamorph-visual-tokens"
VERSION = 2     # 2: keys are absolute paths (1: relative to the image root)
INDEX_FILE = "index.json"
SETTINGS_FILE = "encode.json"
DTYPES = ("bfloat16", "float16", "float32")
# SiglipConfig fields that say how the tower runs, not what it computes: not compared.
TOWER_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
                        "platform")


def tower_fields(config: dict) -> dict:
    """A tower config dict without its runtime fields (what a store records and checks)."""
    return {k: v for k, v in config.items() if k not in TOWER_RUNTIME_FIELDS}


class TokenStoreError(InputError, ValueError):
    """A store that cannot be used (incomplete, other settings, a missing key); the message
    names the store's file and field."""


def numpy_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise TokenStoreError(f"dtype {name!r} is not one of {DTYPES}")
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def image_key(path: str) -> str:
    """The store key of an image file: its absolute, normalised path with "/" separators."""
    return os.path.abspath(os.fspath(path)).replace(os.sep, "/")


def _write_json_atomic(path: Path, value) -> None:
    # A temporary name of this process's own: every process of a multi-process encode
    # writes the same settings file, and one's rename must not take another's half-file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TokenStoreError(f"{path}: not valid JSON ({error})") from None


# --- writing -----------------------------------------------------------------------------

def prepare(store: str | Path, settings: dict) -> Path:
    """Create the store folder (or check a started one was started with the same
    settings); remove parts that were cut off. Returns the folder."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(settings))   # as it reads back (tuples -> lists)
    path = store / SETTINGS_FILE
    if path.exists():
        before = _read_json(path)
        for field in sorted(set(before) | set(settings)):
            if before.get(field) != settings.get(field):
                raise TokenStoreError(
                    f"{path}: field {field!r} is {before.get(field)!r}, this run's is "
                    f"{settings.get(field)!r}; a store is written with one tower and dtype "
                    "(write to a new --output, or delete the old store)")
    else:
        _write_json_atomic(path, settings)
    return store


def remove_cut_parts(store: Path, process_index: int) -> None:
    """Delete this process's parts that have no keys file (a run stopped while writing)."""
    for part in store.glob(f"part-{process_index:05d}-*.array_record"):
        if not part.with_name(part.name[:-len(".array_record")] + ".keys.json").exists():
            part.unlink()


def committed_parts(store: Path) -> list[tuple[str, list[str]]]:
    """(part file name, its keys) of every complete part, in name order."""
    out = []
    for keys_file in sorted(store.glob("part-*.keys.json")):
        name = keys_file.name[:-len(".keys.json")] + ".array_record"
        if not (store / name).exists():
            raise TokenStoreError(f"{keys_file}: its part file {name} is missing")
        out.append((name, list(_read_json(keys_file))))
    return out


class PartWriter:
    """Writes one process's parts: `add(key, tokens)`; every `part_size` images the part
    is closed and committed (its keys file written), and so is the last one by `close()`."""

    def __init__(self, store: Path, process_index: int, dtype: str, shape: tuple[int, int],
                 part_size: int):
        self.store = Path(store)
        self.process_index = process_index
        self.dtype = numpy_dtype(dtype)
        self.shape = tuple(shape)
        self.part_size = int(part_size)
        taken = [int(p.name.split("-")[2].split(".")[0])
                 for p in self.store.glob(f"part-{process_index:05d}-*.keys.json")]
        self.next_part = max(taken, default=-1) + 1
        self._writer = None
        self._keys: list[str] = []
        self._name = ""

    def add(self, key: str, tokens: np.ndarray) -> None:
        if tokens.shape != self.shape:
            raise ValueError(f"tokens of {key!r} have shape {tokens.shape}, the store's is "
                             f"{self.shape}")
        if self._writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter
            self._name = f"part-{self.process_index:05d}-{self.next_part:06d}"
            self.next_part += 1
            # group_size 1: every entry can be read alone (random access while training).
            self._writer = ArrayRecordWriter(str(self.store / f"{self._name}.array_record"),
                                             "group_size:1")
        values = np.ascontiguousarray(tokens.astype(self.dtype))
        self._writer.write(values.view(np.uint8).tobytes())
        self._keys.append(key)
        if len(self._keys) >= self.part_size:
            self.commit()

    def commit(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        _write_json_atomic(self.store / f"{self._name}.keys.json", self._keys)
        self._writer, self._keys = None, []

    def close(self) -> None:
        self.commit()


def finalize(store: Path, wanted: Iterable[str]) -> dict:
    """Write index.json when every wanted key is in a committed part; returns the index.
    A key in several parts (a rerun with another process count) is read from the first."""
    store = Path(store)
    settings = _read_json(store / SETTINGS_FILE)
    parts = committed_parts(store)
    have = set()
    for _, keys in parts:
        have.update(keys)
    missing = sorted(set(wanted) - have)
    if missing:
        raise TokenStoreError(f"{store}: {len(missing)} images have no tokens yet (first: "
                              f"{missing[0]!r}); run the encode command again to finish")
    index = dict(settings, parts=[name for name, _ in parts],
                 counts=[len(keys) for _, keys in parts], count=len(have))
    _write_json_atomic(store / INDEX_FILE, index)
    return index


# --- reading -----------------------------------------------------------------------------

class TokenStore:
    """A complete store: `store[key]` -> tokens [V, C] in the stored dtype.

    Pickles without its open files (grain worker processes reopen them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.exists():
            what = ("an incomplete store (no index.json yet; rerun the encode command)"
                    if (self.path / SETTINGS_FILE).exists() else "not a visual token store")
            raise TokenStoreError(f"{self.path}: {what}")
        index = _read_json(index_path)
        if index.get("format") == FORMAT and index.get("version") == 1:
            raise TokenStoreError(
                f"{index_path}: field 'version' is 1: this store's keys are paths relative "
                "to an image root, which can name two images; re-encode it "
                "(python -m metamorph_jax.data.encode into a new --output)")
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise TokenStoreError(f"{index_path}: field 'format'/'version' is "
                                  f"{index.get('format')!r}/{index.get('version')!r}, expected "
                                  f"{FORMAT!r}/{VERSION}")
        self.index = index
        self.index_path = index_path
        self.dtype = numpy_dtype(index["dtype"])
        self.shape = tuple(int(n) for n in index["shape"])
        self.image_size = int(index["image_size"])
        self._files = [str(self.path / name) for name in index["parts"]]
        self._positions: dict[str, int] = {}
        offset = 0
        for name in index["parts"]:
            keys = _read_json(self.path / (name[:-len(".array_record")] + ".keys.json"))
            for position, key in enumerate(keys):
                self._positions.setdefault(key, offset + position)
            offset += len(keys)
        self._source = None
        self._pid = None

    def __len__(self) -> int:
        return len(self._positions)

    def keys(self) -> list[str]:
        return sorted(self._positions)

    def __contains__(self, key: str) -> bool:
        return key in self._positions

    def __getitem__(self, key: str) -> np.ndarray:
        if self._source is None or self._pid != os.getpid():
            import grain
            self._source = grain.sources.ArrayRecordDataSource(self._files)
            self._pid = os.getpid()
        raw = self._source[self._positions[key]]
        return np.frombuffer(raw, self.dtype).reshape(self.shape)

    def bytes_on_disk(self) -> int:
        return sum(os.path.getsize(f) for f in self._files)

    def check(self, *, image_size: int | None = None, num_tokens: int | None = None,
              width: int | None = None, where: str = "") -> None:
        """Refuse a store made for another image size, token count or tower width."""
        prefix = f"{where}: " if where else ""
        for field, want, have in (("image_size", image_size, self.image_size),
                                  ("shape[0] (tokens per image)", num_tokens, self.shape[0]),
                                  ("shape[1] (token width)", width, self.shape[1])):
            if want is not None and int(want) != have:
                raise TokenStoreError(f"{prefix}{self.index_path} field {field} is {have}, "
                                      f"expected {want}")

    def check_tower(self, tower_config: dict, where: str = "") -> None:
        """Refuse a store written by a tower of another configuration."""
        prefix = f"{where}: " if where else ""
        stored, given = self.index.get("tower", {}), tower_fields(tower_config)
        for field in sorted(set(stored) | set(given)):
            # JSON turns tuples into lists; compare as JSON does.
            if json.loads(json.dumps(stored.get(field))) != json.loads(json.dumps(given.get(field))):
                raise TokenStoreError(
                    f"{prefix}{self.index_path} field 'tower.{field}' is {stored.get(field)!r}, "
                    f"the model's vision tower has {given.get(field)!r}: the tokens were "
                    "made by another tower")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, {len(self)} images, {self.index['dtype']})"


# --- the images of a record --------------------------------------------------------------

def image_fields(raw_record, count: int, where: str = "?") -> list[str]:
    """The record field each of a parsed record's `count` images comes from ("image",
    "images[2]", "video (frame 3)"), for error messages."""
    from metamorph_jax.data.conversation import record_object
    record = record_object(raw_record, where)
    if record.get("video") is not None:
        return [f"video (frame {i})" for i in range(count)]
    for field in ("image", "images"):
        value = record.get(field)
        if value is not None:
            if isinstance(value, (list, tuple)):
                return [f"{field}[{i}]" for i in range(count)]
            return [field] * count
    return ["?"] * count


def record_keys(image_paths, raw_record, where: str) -> list[tuple[str, str, str]]:
    """(key, path, field) of each image of a parsed record; an image given as an array
    (no file) is a TokenStoreError naming the record and the field."""
    fields = image_fields(raw_record, len(image_paths), where)
    out = []
    for path, field in zip(image_paths, fields):
        if not isinstance(path, str):
            raise TokenStoreError(f"{where}: field {field!r} is pixels, not an image file "
                                  "(a TFDS image or a frame of a video file); precomputed "
                                  "tokens are stored per image file")
        out.append((image_key(path), path, field))
    return out
