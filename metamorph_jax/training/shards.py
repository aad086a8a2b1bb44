"""Which data shards a process reads, and the few cross-process agreements the runner needs.

The data of a stage is read as S shards (the run's `data_shards`; 0 means one per process):
shard s is every S-th element of the shuffled mixture from s on (pipeline.record_dataset),
packed into data.batch_size rows. Process i of P reads shards i*S/P .. (i+1)*S/P - 1 and
contributes their rows, in shard order, to the global batch; processes hold consecutive
devices of the mesh, so the global batch is shard 0's rows, then shard 1's, ... on any
number of processes. A fixed `data_shards` therefore gives one process with 4 devices the
batches of two processes with 2 devices each (the multi-process test relies on it).

The iterator state saved per process (checkpoint.py, grain's handler) is that of the
process's shards; a checkpoint resumes on the same number of processes and data shards
(the parameters restore onto any mesh).
"""
from __future__ import annotations

import jax
import numpy as np

from metamorph_jax.input_errors import BadInput


def process_shards(data_shards: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> tuple[list[int], int]:
    """(the shards this process reads, the shard count)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    shards = data_shards or count
    if shards % count:
        raise BadInput(f"config field 'data_shards' = {data_shards} does not divide over "
                       f"the run's {count} processes")
    per = shards // count
    return list(range(index * per, (index + 1) * per)), shards


def shard_data(data, index: int, count: int) -> dict:
    """The data fields of shard `index` of `count`."""
    values = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    return dict(values, shard_index=index, shard_count=count)


def _concatenate(batches: list[dict]) -> dict:
    return {key: np.concatenate([np.asarray(b[key]) for b in batches]) for key in batches[0]}


class ShardedBatches:
    """One iterator over several shards' batches, concatenated row-wise in shard order.
    With one shard it passes that shard's batches through (and its state, unchanged)."""

    def __init__(self, objective, data, shards: list[int], count: int):
        self.shards = list(shards)
        self.iterators = [objective.batches(shard_data(data, s, count)) for s in self.shards]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = [next(iterator) for iterator in self.iterators]
        return batches[0] if len(batches) == 1 else _concatenate(batches)

    def get_state(self):
        if len(self.iterators) == 1:
            return self.iterators[0].get_state()
        return {"shards": self.shards, "states": [i.get_state() for i in self.iterators]}

    def set_state(self, state) -> None:
        if len(self.iterators) == 1:
            if isinstance(state, dict) and "shards" in state:
                raise BadInput(f"the checkpoint's data state is of shards {state['shards']}, "
                               f"this process reads shard {self.shards}: resume with the "
                               "same number of processes and config field 'data_shards'")
            self.iterators[0].set_state(state)
            return
        if not isinstance(state, dict) or state.get("shards") != self.shards:
            saved = state.get("shards") if isinstance(state, dict) else "one shard"
            raise BadInput(f"the checkpoint's data state is of shards {saved}, this process "
                           f"reads shards {self.shards}: resume with the same number of "
                           "processes and config field 'data_shards'")
        for iterator, part in zip(self.iterators, state["states"]):
            iterator.set_state(part)


def all_processes(flag: bool) -> bool:
    """True when `flag` is true on every process (a collective: all must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
    return bool(np.all(flags))


def all_processes_min(value: int) -> int:
    """The smallest `value` over the processes (a collective: all must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    values = multihost_utils.process_allgather(np.asarray(int(value), np.int32))
    return int(np.min(values))


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
