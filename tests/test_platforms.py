"""Commands start on the CPU quietly when libtpu is installed and nothing is attached."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metamorph_jax import platforms

REPO = Path(__file__).resolve().parents[1]


def test_cpu_only_where_jax_would_fall_back_to_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax")   # as before a command's first JAX import
    monkeypatch.setattr(platforms.importlib.util, "find_spec",
                        lambda name: object() if name == "libtpu" else None)
    monkeypatch.setattr(platforms, "has_accelerator", lambda: False)
    environ = {}
    assert platforms.prefer_cpu_without_accelerator(environ)
    assert environ == {"JAX_PLATFORMS": "cpu"}
    chosen = {"JAX_PLATFORMS": "tpu"}   # the user's choice stands
    assert not platforms.prefer_cpu_without_accelerator(chosen)
    assert chosen == {"JAX_PLATFORMS": "tpu"}
    monkeypatch.setattr(platforms, "has_accelerator", lambda: True)   # a TPU VM, a GPU plugin
    environ = {}
    assert not platforms.prefer_cpu_without_accelerator(environ) and environ == {}


def test_no_change_once_jax_is_imported():
    environ = {}
    assert "jax" in sys.modules   # conftest imported it
    assert not platforms.prefer_cpu_without_accelerator(environ) and environ == {}


def test_a_fresh_process_starts_on_the_cpu():
    pytest.importorskip("libtpu", reason="the start-up noise comes from an installed libtpu")
    if platforms.has_accelerator():
        pytest.skip("an accelerator is attached: JAX chooses it")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("import os; from metamorph_jax import platforms; "
            "platforms.prefer_cpu_without_accelerator(); import jax; "
            "print(os.environ['JAX_PLATFORMS'], jax.default_backend())")
    started = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert started.stdout.split() == ["cpu", "cpu"], started.stderr[-2000:]
