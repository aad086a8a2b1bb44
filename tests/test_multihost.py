"""train.py as a multi-process run: two processes x 2 CPU devices (gloo collectives on
localhost) against one process x 4 devices, with the same configs/tiny.py command.

The run reads data_shards=2 shards of 4 rows, so both layouts see the same global batches
(training/shards.py). Measured here: the losses agree to 1.9e-7 relative (the all-reduces
add in another order); the test allows 1e-6.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"
RTOL = 1e-6
HEARTBEAT_S = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def command(assets: Path, work: Path) -> list[str]:
    small = ["--config.stages.adapter.steps=2", "--config.stages.instruct.steps=4",
             "--config.checkpoint_every=2", "--config.eval_every=4", "--config.data_shards=2",
             "--config.order=('adapter','instruct')", "--config.final_eval={}"]
    rows = [f"--config.stages.{stage}.{data}.batch_size=4" for stage in ("adapter", "instruct")
            for data in ("data", "eval_data")]
    return [sys.executable, str(REPO / "train.py"), "--config", f"{TINY}:{assets}",
            "--workdir", str(work), *small, *rows]


def env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")


def start(assets: Path, work: Path, processes: int, logs: Path) -> list[subprocess.Popen]:
    """The run's processes (stdout and stderr to logs/<i>.txt)."""
    logs.mkdir(parents=True, exist_ok=True)
    base = command(assets, work)
    if processes == 1:
        return [subprocess.Popen(base, cwd=REPO, env=env(4), stdout=open(logs / "0.txt", "w"),
                                 stderr=subprocess.STDOUT)]
    extra = ["--coordinator", f"localhost:{free_port()}", "--num-processes", str(processes),
             f"--heartbeat-timeout={HEARTBEAT_S}"]
    return [subprocess.Popen(base + extra + ["--process-id", str(i)], cwd=REPO,
                             env=env(4 // processes), stdout=open(logs / f"{i}.txt", "w"),
                             stderr=subprocess.STDOUT) for i in range(processes)]


def finish(processes: list[subprocess.Popen], logs: Path, timeout: float = 900) -> str:
    """Wait for all; fail with the logs' tails unless all exit 0; process 0's output."""
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    outputs = [(logs / f"{i}.txt").read_text() for i in range(len(processes))]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return outputs[0]


def train_losses(work: Path) -> list[tuple]:
    lines = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return [(l["stage"], l["step"], l.get("loss", l.get("eval_loss"))) for l in lines]


def assert_same_losses(actual: list[tuple], expected: list[tuple]) -> None:
    assert [a[:2] for a in actual] == [e[:2] for e in expected]
    gap = max(abs(a[2] / e[2] - 1) for a, e in zip(actual, expected))
    print(f"losses within {gap:.1e} relative")   # the measured error
    np.testing.assert_allclose([a[2] for a in actual], [e[2] for e in expected], rtol=RTOL)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_one_is_killed(tiny_assets, tmp_path):
    """1 x 4 devices is the reference. Then 2 x 2 devices: process 1 is SIGKILLed once the
    instruct stage's first checkpoint exists; process 0 must notice and exit by itself
    (heartbeat timeout), the same command on both resumes from the last complete checkpoint
    and the whole loss sequence (train and eval) equals the reference's."""
    from metamorph_jax.training.checkpoint import StageCheckpoints
    assets = tiny_assets
    reference = tmp_path / "one"
    output = finish(start(assets, reference, 1, tmp_path / "logs_one"), tmp_path / "logs_one")
    assert "stage instruct: 4 steps" in output
    expected = train_losses(reference)

    work, logs = tmp_path / "two", tmp_path / "logs_two"
    processes = start(assets, work, 2, logs)
    first = work / "instruct" / "checkpoints" / "2"   # renamed into place when complete
    try:
        while not first.exists() and all(p.poll() is None for p in processes):
            time.sleep(0.02)
        processes[1].send_signal(signal.SIGKILL)
        processes[1].wait(timeout=60)
        killed = time.time()
        # the survivor must not hang: it stops within a few heartbeat timeouts
        processes[0].wait(timeout=12 * HEARTBEAT_S)
        noticed_s = time.time() - killed
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert processes[1].returncode == -signal.SIGKILL, "the run ended before the kill"
    assert processes[0].returncode != 0, (logs / "0.txt").read_text()[-3000:]
    print(f"process 0 stopped {noticed_s:.1f} s after its peer was killed")
    checkpoints = StageCheckpoints(work / "instruct" / "checkpoints", 2)
    latest = checkpoints.latest_step()
    checkpoints.close()
    assert latest is not None and latest >= 2

    rerun = finish(start(assets, work, 2, tmp_path / "logs_rerun"), tmp_path / "logs_rerun")
    assert "stage adapter: already done" in rerun, rerun[-2000:]
    assert f"stage instruct: resumed at step {latest}," in rerun, rerun[-2000:]
    assert_same_losses(train_losses(work), expected)
