"""Joining a multi-process (multi-host) JAX run: one call at the top of each entry point.

    python train.py ... --coordinator HOST:PORT --num-processes N --process-id I

`initialize` calls `jax.distributed.initialize` when the run has more than one process:
- with an explicit coordinator (the flags, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID; a flag wins over its variable), all three must be known;
- else on a Cloud TPU host or under SLURM with several tasks, where JAX finds them itself;
- else (a laptop, one GPU host) nothing happens: one process.
It must run before anything touches a device. On CPU hosts the collectives are gloo's.

A process whose peer dies does not wait forever: JAX's coordination service (on process 0)
marks a process dead after `heartbeat_timeout` seconds without a heartbeat (JAX's default
is 100) and stops every other process with an error naming the dead task; a peer blocked
in a collective sees its connection drop. Either way the run exits non-zero, and running
the same command again on every host resumes from the last complete checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
from typing import Mapping

from metamorph_jax.input_errors import InputError

logger = logging.getLogger("metamorph_jax.distributed")

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
         "process_id": "--process-id"}


class DistributedConfigError(InputError, ValueError):
    """Incomplete or inconsistent multi-process settings (the message names the flag or
    variable)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What jax.distributed.initialize is called with; None fields are found by JAX from
    the cluster (Cloud TPU, SLURM)."""
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    detected: str = "flags"   # "flags" (or variables), "tpu" or "slurm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The three multi-process flags, for argparse entry points."""
    group = parser.add_argument_group("multi-process runs (default: found on Cloud TPU and "
                                      "SLURM, else one process)")
    group.add_argument(FLAGS["coordinator"], default=None, metavar="HOST:PORT",
                       help=f"process 0's address (or ${ENV['coordinator']})")
    group.add_argument(FLAGS["num_processes"], type=int, default=None, metavar="N",
                       help=f"processes in the run (or ${ENV['num_processes']})")
    group.add_argument(FLAGS["process_id"], type=int, default=None, metavar="I",
                       help=f"this process, 0..N-1 (or ${ENV['process_id']})")


def define_flags(registry) -> None:
    """The same flags in an absl FlagValues (train.py's registry, runner.parse_command),
    plus --heartbeat-timeout."""
    from absl import flags
    flags.DEFINE_string(FLAGS["coordinator"][2:], None,
                        f"HOST:PORT of process 0 (or ${ENV['coordinator']}); default: found "
                        "on Cloud TPU and SLURM, else one process", flag_values=registry)
    flags.DEFINE_integer(FLAGS["num_processes"][2:], None,
                         f"processes in the run (or ${ENV['num_processes']})",
                         flag_values=registry)
    flags.DEFINE_integer(FLAGS["process_id"][2:], None,
                         f"this process, 0..N-1 (or ${ENV['process_id']})", flag_values=registry)
    flags.DEFINE_integer("heartbeat-timeout", None,
                         "seconds without a heartbeat after which a process counts as dead and "
                         "the run stops (default: JAX's, 100)", flag_values=registry)


def from_flags(registry) -> dict:
    """define_flags' values as initialize's keyword arguments."""
    return {"coordinator": registry["coordinator"].value,
            "num_processes": registry["num-processes"].value,
            "process_id": registry["process-id"].value,
            "heartbeat_timeout": registry["heartbeat-timeout"].value}


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{name} must be an integer, got {value!r}") from None


def slurm_node_devices(environ: Mapping[str, str] | None = None) -> list[int] | None:
    """Under SLURM with one task per node, every GPU of the node (0..SLURM_GPUS_ON_NODE-1):
    JAX would otherwise give a SLURM task the one GPU of its local rank. None elsewhere."""
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ or environ.get("SLURM_NTASKS_PER_NODE") != "1":
        return None
    gpus = _int(environ.get("SLURM_GPUS_ON_NODE"), "$SLURM_GPUS_ON_NODE")
    return list(range(gpus)) if gpus else None


def _on_tpu_host() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None,
             environ: Mapping[str, str] | None = None,
             tpu_host: bool | None = None) -> Settings | None:
    """The settings of this process's run, or None for a single-process run."""
    environ = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes,
             "process_id": process_id}
    values = {}
    for field, value in given.items():
        if value is None:
            value = environ.get(ENV[field]) or None
            name = ENV[field]
        else:
            name = FLAGS[field]
        values[field] = value if field == "coordinator" else _int(value, name)
    if any(v is not None for v in values.values()):
        missing = [f"{FLAGS[f]} (or ${ENV[f]})" for f, v in values.items() if v is None]
        if missing:
            raise DistributedConfigError(
                f"a multi-process run needs all of --coordinator, --num-processes and "
                f"--process-id; missing: {', '.join(missing)}")
        count, index = values["num_processes"], values["process_id"]
        if count < 1 or not 0 <= index < count:
            raise DistributedConfigError(
                f"--process-id must be in 0..{count - 1} for --num-processes {count}, "
                f"got {index}")
        if ":" not in values["coordinator"]:
            raise DistributedConfigError(
                f"--coordinator must be HOST:PORT, got {values['coordinator']!r}")
        return None if count == 1 else Settings(detected="flags", **values)
    if _int(environ.get("SLURM_NTASKS"), "$SLURM_NTASKS") not in (None, 1) \
            and "SLURM_JOB_ID" in environ:
        return Settings(detected="slurm")
    if _on_tpu_host() if tpu_host is None else tpu_host:
        return Settings(detected="tpu")
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               heartbeat_timeout: int | None = None) -> Settings | None:
    """Join the run (see the module docstring); returns what it used, None for one process.
    heartbeat_timeout: seconds (None: JAX's default)."""
    chosen = settings(coordinator, num_processes, process_id)
    if chosen is None:
        return None
    timeouts = {}
    if heartbeat_timeout is not None:
        if heartbeat_timeout < 1:
            raise DistributedConfigError(
                f"--heartbeat-timeout must be at least 1 second, got {heartbeat_timeout}")
        timeouts["heartbeat_timeout_seconds"] = int(heartbeat_timeout)
    import jax
    if chosen.detected == "flags" and not _on_tpu_host():
        # CPU processes (tests, CPU clusters) talk over gloo; GPUs and TPUs ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    devices = slurm_node_devices()
    if devices is not None:
        timeouts["local_device_ids"] = devices
    jax.distributed.initialize(coordinator_address=chosen.coordinator,
                               num_processes=chosen.num_processes,
                               process_id=chosen.process_id, **timeouts)
    logger.info("process %d of %d (%s)", jax.process_index(), jax.process_count(),
                chosen.detected)
    return chosen
