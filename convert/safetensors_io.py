"""Streaming safetensors reader and writer on numpy memory maps.

Our own small implementation because the safetensors numpy API cannot hold bfloat16;
with ml_dtypes every stored dtype round-trips bit for bit and nothing is upcast.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from metamorph_jax.input_errors import InputError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(InputError, ValueError):
    """A file that is not a well-formed safetensors file; the message names the file."""


def read_header(path: str | Path) -> tuple[dict, int]:
    """Returns (header without __metadata__, byte offset where tensor data starts)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise SafetensorsError(f"{path}: not a safetensors file (header size {size})")
        encoded = f.read(size)
    if len(encoded) != size:
        raise SafetensorsError(f"{path}: truncated safetensors header ({len(encoded)} of "
                               f"{size} bytes)")
    try:
        header = json.loads(encoded)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise SafetensorsError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + size


def _is_int_list(value, length: int | None = None) -> bool:
    return (isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)
            and (length is None or len(value) == length))


def open_tensors(path: str | Path) -> dict[str, Callable[[], np.ndarray]]:
    """name -> loader returning a read-only memory map of that tensor (nothing read yet)."""
    path = Path(path)
    header, start = read_header(path)
    file_size = path.stat().st_size
    loaders = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"{path}: tensor {name!r}: header entry is not an object")
        if info.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype "
                                   f"{info.get('dtype')!r}")
        for field, length in (("shape", None), ("data_offsets", 2)):
            if not _is_int_list(info.get(field), length):
                raise SafetensorsError(f"{path}: tensor {name!r}: field {field!r} is "
                                       f"{info.get(field)!r}")
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        if start + end > file_size or end - begin != dtype.itemsize * int(np.prod(shape)):
            raise SafetensorsError(f"{path}: tensor {name!r} is truncated or its offsets "
                                   f"are wrong")

        def load(begin=begin, dtype=dtype, shape=shape):
            if int(np.prod(shape)) == 0:
                return np.zeros(shape, dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
        loaders[name] = load
    return loaders


def tensor_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def write_file(path: str | Path, entries: Iterable[tuple[str, tuple, np.dtype, Callable]],
               on_tensor: Callable[[str], None] | None = None) -> None:
    """Writes tensors one at a time. entries: (name, shape, dtype, producer()).

    The header is laid out from shapes first, so only one tensor is in memory at once.
    """
    entries = list(entries)
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        size = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype, produce in entries:
            array = np.ascontiguousarray(produce())
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{path}: tensor {name!r} came out {array.shape} "
                                 f"{array.dtype}, expected {tuple(shape)} {np.dtype(dtype)}")
            # Raw bytes of the contiguous array, without another copy (little-endian hosts).
            f.write(array.reshape(-1).view(np.uint8).data)
            if on_tensor is not None:
                on_tensor(name)
