"""Splitting work by index across the processes of a run and gathering the results.

Every process holds the same ordered list of work items (samples, captions, prompts,
batches); process p of P takes items p, p + P, p + 2P, ... (`process_rows`), works on them
with its own devices, and the results are all-gathered back into item order
(`gather_texts`, `gather_rows`). With one process these are plain pass-throughs and touch
no collective.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def process_rows(count: int, index: int, processes: int) -> list[int]:
    """The items of a list of `count` that process `index` of `processes` takes."""
    return list(range(index, count, processes))


def gather_rows(local: np.ndarray, count: int, index: int, processes: int) -> np.ndarray:
    """Each process's rows local [n_p, ...] (process p holds the items
    process_rows(count, p, processes), in order) -> all [count, ...] rows in item order,
    on every process. The values travel bit for bit (any dtype)."""
    local = np.asarray(local)
    if processes == 1 or count == 0:
        return local
    from jax.experimental import multihost_utils

    share = -(-count // processes)
    padded = np.zeros((share, *local.shape[1:]), local.dtype)
    padded[:len(local)] = local
    # As raw bytes: process_allgather would turn float64 into float32 without x64.
    raw = padded.reshape(share, -1).view(np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(raw))   # [P, share, bytes]
    out = np.zeros((count, *local.shape[1:]), local.dtype)
    for process in range(processes):
        rows = process_rows(count, process, processes)
        values = gathered[process, :len(rows)].copy().view(local.dtype)
        out[rows] = values.reshape(len(rows), *local.shape[1:])
    return out


def gather_texts(local: Sequence[str], count: int, index: int, processes: int) -> list[str]:
    """gather_rows for strings (UTF-8): every process's texts -> all `count` in item order."""
    if processes == 1:
        return list(local)
    from jax.experimental import multihost_utils

    encoded = [text.encode("utf-8") for text in local]
    width = int(multihost_utils.process_allgather(
        np.asarray(max((len(e) for e in encoded), default=0), np.int32)).max())
    table = np.zeros((len(local), width + 4), np.uint8)  # 4 bytes of length, then the text
    for row, data in enumerate(encoded):
        table[row, :4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
        table[row, 4:4 + len(data)] = np.frombuffer(data, np.uint8)
    out = []
    for entry in gather_rows(table, count, index, processes):
        length = int(np.frombuffer(entry[:4].tobytes(), np.uint32)[0])
        out.append(entry[4:4 + length].tobytes().decode("utf-8"))
    return out


def barrier(name: str, processes: int) -> None:
    """Wait until every process has reached `name` (nothing with one process)."""
    if processes > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
