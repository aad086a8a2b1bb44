"""training/shards.process_shards: which data shards each process reads (the multi-process
batches themselves are compared in tests/test_multihost.py)."""
import pytest

from metamorph_jax.training.shards import process_shards


def test_shards_split_evenly_in_order_over_the_processes():
    assert process_shards(0, 0, 1) == ([0], 1)             # default: one per process
    assert process_shards(0, 3, 4) == ([3], 4)
    assert process_shards(2, 0, 1) == ([0, 1], 2)          # one process reads both
    assert [process_shards(8, i, 4)[0] for i in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="'data_shards' = 3 does not divide over the run's 2"):
        process_shards(3, 0, 2)
