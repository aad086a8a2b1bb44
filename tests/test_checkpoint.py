"""Stage checkpoints: state + iterator state + meta round-trip; a checkpoint that was never
completed (a temporary folder, or a save killed half-way) is never restored."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph_jax.training.checkpoint import StageCheckpoints

REPO = Path(__file__).resolve().parents[1]


class CountingIterator:
    """Stands in for a grain iterator: JSON-able state, restored by set_state."""

    def __init__(self, position: int = 0):
        self.position = position

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]


def small_state(value: float) -> dict:
    return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def test_round_trip_and_a_temporary_folder_is_skipped(tmp_path):
    checkpoints = StageCheckpoints(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, small_state(step), CountingIterator(10 * step),
                         {"stage": "s", "step": step})
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 3]   # keep=2
    # A half-written step 4: Orbax's temporary folder, holding part of a copy of step 3.
    partial = tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "ckpt" / "3", partial)
    shutil.rmtree(partial / "state")
    fresh = StageCheckpoints(tmp_path / "ckpt", keep=2)
    assert fresh.latest_step() == 3
    iterator = CountingIterator()
    state, meta = fresh.restore(3, abstract(small_state(0)), iterator)
    assert meta == {"stage": "s", "step": 3} and iterator.position == 30
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 3.0))
    fresh.close()


KILLED_SAVE = r"""
import sys, time
from pathlib import Path
import jax.numpy as jnp
from metamorph_jax.training import checkpoint
from tests.test_checkpoint import CountingIterator, small_state

directory, marker = Path(sys.argv[1]), Path(sys.argv[2])
checkpoints = checkpoint.StageCheckpoints(directory, keep=3)
checkpoints.save(1, small_state(1.0), CountingIterator(10), {"step": 1})
checkpoints.wait()
# The second save stalls while writing the iterator state; the test kills us there.
def stall(self):
    marker.write_text("saving")
    time.sleep(120)
    return self._bytes
checkpoint._IteratorSnapshot.get_state = stall
checkpoints.save(2, {"w": jnp.ones((512, 512)), "step": jnp.asarray(2)}, CountingIterator(20),
                 {"step": 2})
checkpoints.wait()
"""


def test_a_save_killed_half_way_is_never_restored(tmp_path):
    directory, marker = tmp_path / "ckpt", tmp_path / "saving"
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(directory), str(marker)],
                               cwd=REPO, env=dict(os.environ, XLA_FLAGS=""))
    try:
        deadline = time.time() + 300
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the second save never started"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith("2")]
    assert leftovers and "2" not in leftovers, leftovers   # a partial step 2 was left behind
    checkpoints = StageCheckpoints(directory, keep=3)
    assert checkpoints.latest_step() == 1
    iterator = CountingIterator()
    state, meta = checkpoints.restore(1, abstract(small_state(0)), iterator)
    assert meta == {"step": 1} and iterator.position == 10
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 1.0))
    checkpoints.close()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="'keep'"):
        StageCheckpoints(tmp_path, keep=0)


def test_a_checkpoint_of_another_process_count_is_refused_naming_it(tmp_path):
    """Saved by 2 processes (their data files, as grain names them), restored by 1."""
    checkpoints = StageCheckpoints(tmp_path / "ckpt", keep=2)
    checkpoints.save(1, small_state(1), CountingIterator(1), {"stage": "s", "step": 1})
    checkpoints.wait()
    data = tmp_path / "ckpt" / "1" / "data"
    [mine] = data.glob("process_*-of-*.json")
    assert mine.name == "process_0-of-1.json"
    for index in (0, 1):
        shutil.copy(mine, data / f"process_{index}-of-2.json")
    mine.unlink()
    with pytest.raises(ValueError, match=r"ckpt/1: saved by 2 process\(es\), this run has 1"):
        checkpoints.restore(1, abstract(small_state(0)), CountingIterator())
    checkpoints.close()
