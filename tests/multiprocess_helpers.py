"""Running entry points (eval.py, generate.py) as a real multi-process JAX run: N local
processes with D simulated CPU devices each, joined over a free localhost port with the
--coordinator / --num-processes / --process-id flags (gloo collectives). The first call
joins the run; later calls in the same processes find it joined."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Calls MODULE.main(argv) for each [module, argv] in order (one process start for all);
# the first argv carries the process flags.
DRIVER = ("import importlib, json, sys\n"
          "for name, argv in json.loads(sys.argv[1]):\n"
          "    assert importlib.import_module(name).main(argv) == 0, argv\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_processes(calls: list[tuple[str, list]], processes: int, devices: int = 2,
                  timeout: float = 900) -> list[str]:
    """Runs `calls` ((module, argv) pairs: module.main(argv), in order) in each of
    `processes` processes (one process: no flags); returns each process's stdout (without
    gloo's connection lines). Fails with a process's stderr when one fails."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    port = free_port()
    running = []
    for index in range(processes):
        argvs = [[module, [str(a) for a in argv]] for module, argv in calls]
        if processes > 1:
            argvs[0][1] += ["--coordinator", f"localhost:{port}", "--num-processes",
                            str(processes), "--process-id", str(index)]
        running.append(subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs, failures = [], []
    for index, process in enumerate(running):
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in running:
                other.kill()
            raise
        # gloo reports its connections on stdout from C++, unbuffered (a report can be cut
        # into pieces by Python's output): not the program's output.
        outputs.append("".join(line for line in out.splitlines(keepends=True)
                               if "[Gloo]" not in line and "peer ranks" not in line))
        if process.returncode != 0:
            failures.append(f"process {index} exited {process.returncode}:\n{err[-4000:]}")
    assert not failures, "\n".join(failures)
    return outputs
