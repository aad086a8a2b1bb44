"""Test-wide set-up: 8 simulated CPU devices for sharding tests, fp32 matmuls, the CPU
backend when libtpu is installed without a TPU, a persistent compilation cache.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it lives here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With libtpu installed (requirements-tpu.txt, for the compile-only TPU plan tests) and no
# accelerator attached, ask for the CPU directly (metamorph_jax/platforms.py): the TPU
# topology tests do not need the TPU backend.
from metamorph_jax import platforms  # noqa: E402  (imports no JAX)

platforms.prefer_cpu_without_accelerator()
# One persistent compilation cache per test process, inherited by the commands the tests
# start (train.py, eval.py runs): the same program compiled again in another process or
# by another jit object is read back instead of compiled (the executable is the same).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="metamorph_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare against fp32 PyTorch; keep XLA's CPU dots at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """configs/tiny.py's inputs (tiny.ensure_assets: the Shapes world, tokenizer, tiny LLaMA
    and SigLIP), made once for every test module that runs the tiny config."""
    from pathlib import Path

    from metamorph_jax import tiny
    from metamorph_jax.training import runner
    root = tmp_path_factory.mktemp("tiny_assets") / "assets"
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    tiny.ensure_assets(runner.parse_flags(["train.py", "--config", f"{config}:{root}"]).assets)
    return root
