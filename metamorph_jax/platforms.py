"""The platform a command starts JAX on, decided before JAX is imported.

With libtpu installed (requirements-tpu.txt, for compile-only TPU plans) on a host without
any accelerator, JAX first tries the TPU backend, prints libtpu's initialisation errors
and then falls back to the CPU. `prefer_cpu_without_accelerator` asks for the CPU directly
in that case, so the commands start quietly on the backend they would have used anyway.
Compiling for a TPU topology (jax.experimental.topologies) works under it.

`quiet_start` is what every command (and `python -m benchmarks.*`) does first: that, and
no "PyTorch was not found" notice from transformers, which the commands use for
tokenizers only (transformers prints it through its advisory-warning call, which
TRANSFORMERS_NO_ADVISORY_WARNINGS turns off; no other message goes through that call).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import MutableMapping

# Device files of an attached TPU: v2-v5p (/dev/accel*), v5e/v6e (/dev/vfio/<n>).
TPU_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
# JAX's GPU plugins: where one is installed, JAX may start on a GPU; leave it to JAX.
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
               "jax_rocm7_plugin")


def has_accelerator() -> bool:
    """A TPU is attached, or a GPU plugin is installed."""
    return (any(glob.glob(pattern) for pattern in TPU_FILES)
            or any(importlib.util.find_spec(name) is not None for name in GPU_PLUGINS))


def prefer_cpu_without_accelerator(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set JAX_PLATFORMS=cpu when libtpu is installed, no accelerator is attached, the user
    chose no platform and JAX is not imported yet. Returns whether it did."""
    if ("JAX_PLATFORMS" in environ or "jax" in sys.modules
            or importlib.util.find_spec("libtpu") is None or has_accelerator()):
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    return True


def quiet_start(environ: MutableMapping[str, str] = os.environ) -> None:
    """Before JAX and transformers are imported: the platform (above) and no transformers
    notice about a missing PyTorch. A value the user set is kept."""
    prefer_cpu_without_accelerator(environ)
    environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
