"""metamorph_jax.distributed.settings: which runs join a multi-process group, and the errors
for incomplete settings (no processes are started here; tests/test_multihost.py does)."""
import re

import pytest

from metamorph_jax import distributed
from metamorph_jax.distributed import DistributedConfigError, Settings


def test_one_process_without_flags_variables_or_cluster():
    assert distributed.settings(environ={}, tpu_host=False) is None


def test_flags_and_variables_give_the_coordinator_a_flag_wins():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert distributed.settings(environ=env, tpu_host=False) == Settings(
        "10.0.0.1:1234", 4, 3, "flags")
    assert distributed.settings(process_id=1, environ=env, tpu_host=False) == Settings(
        "10.0.0.1:1234", 4, 1, "flags")
    # one process named explicitly: nothing to join
    assert distributed.settings("h:1", 1, 0, environ={}, tpu_host=False) is None


@pytest.mark.parametrize("kwargs, env, words", [
    (dict(coordinator="h:1"), {}, "--num-processes (or $JAX_NUM_PROCESSES), --process-id"),
    ({}, {"JAX_PROCESS_ID": "0"}, "--coordinator (or $JAX_COORDINATOR_ADDRESS)"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), {}, "0..1"),
    (dict(coordinator="host", num_processes=2, process_id=0), {}, "HOST:PORT"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
          "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be an integer"),
])
def test_incomplete_or_bad_settings_name_the_flag_or_variable(kwargs, env, words):
    with pytest.raises(DistributedConfigError, match=re.escape(words)):
        distributed.settings(**kwargs, environ=env, tpu_host=False)


def test_clusters_that_jax_detects_itself():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}
    assert distributed.settings(environ=slurm, tpu_host=False) == Settings(detected="slurm")
    assert distributed.settings(environ={**slurm, "SLURM_NTASKS": "1"}, tpu_host=False) is None
    assert distributed.settings(environ={}, tpu_host=True) == Settings(detected="tpu")


def test_one_task_per_slurm_node_gets_every_gpu_of_the_node():
    node = {"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}
    assert distributed.slurm_node_devices(node) == list(range(8))
    # one task per GPU: JAX's own choice (the task's local rank) stands
    assert distributed.slurm_node_devices(dict(node, SLURM_NTASKS_PER_NODE="8")) is None
    assert distributed.slurm_node_devices({"SLURM_GPUS_ON_NODE": "8"}) is None


def test_train_py_flags_reach_initialize():
    from metamorph_jax.training import runner
    _, options = runner.parse_command(
        ["train.py", "--config", "configs/tiny.py", "--coordinator", "h:5", "--num-processes",
         "2", "--process-id=1", "--heartbeat-timeout", "10"])
    assert distributed.from_flags(options) == dict(coordinator="h:5", num_processes=2,
                                                   process_id=1, heartbeat_timeout=10)
    with pytest.raises(DistributedConfigError, match="--heartbeat-timeout"):
        distributed.initialize("h:5", 2, 1, heartbeat_timeout=0)
