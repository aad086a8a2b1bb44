"""Orbax checkpoints of a stage: train state + data-iterator state + run metadata.

One `StageCheckpoints` per stage folder (WORK_DIR/<stage>/checkpoints). Each checkpoint
(an Orbax step folder) holds three items:

    state   the TrainState (step, trainable, frozen, opt_state, rng, skipped), as sharded
            arrays; restored onto whatever shardings the caller asks for (another mesh too)
    data    the grain iterator's state, one JSON file per process
            (grain.checkpoint's handler: process_<i>-of-<n>.json)
    meta    JSON: stage index and name, step, the whole run config

Saves are asynchronous (the device->host copy happens before `save` returns, so the
donated state may be reused at once; the files are written in the background), keeping
the last `keep` checkpoints. Orbax writes each checkpoint into a temporary folder and
renames it when complete, and lists only finished step folders, so a checkpoint killed
half-way is never restored: `latest_step` is the newest COMPLETE one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from metamorph_jax.input_errors import BadInput


class _IteratorSnapshot:
    """The iterator state taken when `save` is called (grain's handler may write it later
    on a background thread, by which time the live iterator has moved on). Not a grain
    DatasetIterator, so the handler takes its state as bytes."""

    def __init__(self, state: dict | None = None):
        self._bytes = json.dumps(state).encode() if state is not None else None
        self.state: dict | None = None

    def get_state(self) -> bytes:
        return self._bytes

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state.decode())

    def start_prefetch(self) -> None:   # the handler calls this after a restore
        pass


class StageCheckpoints:
    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        if keep < 1:
            raise BadInput(f"config field 'keep' must be at least 1, got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, iterator, meta: dict) -> None:
        """Start saving (returns once the arrays are copied off the devices)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator.get_state())),
            meta=ocp.args.JsonSave(meta)), force=True)

    def check_processes(self, step: int) -> None:
        """A ValueError unless this run has as many processes as the one that saved `step`
        (the data state is one file per process; the arrays restore onto any mesh)."""
        import jax
        saved = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        counts = {int(path.stem.rsplit("-of-", 1)[1]) for path in saved}
        if counts and counts != {jax.process_count()}:
            raise ValueError(
                f"{self.directory / str(step)}: saved by {sorted(counts)[0]} process(es), "
                f"this run has {jax.process_count()}; resume with the same number of "
                "processes (the data iterator state is per process)")

    def restore(self, step: int, abstract_state: Any, iterator) -> tuple[Any, dict]:
        """(state placed as `abstract_state`'s shardings say, meta); sets `iterator`'s state."""
        self.check_processes(step)
        snapshot = _IteratorSnapshot()
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(snapshot),
            meta=ocp.args.JsonRestore()))
        iterator.set_state(snapshot.state)
        return restored.state, dict(restored.meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
