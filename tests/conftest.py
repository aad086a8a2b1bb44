"""Test-wide set-up: 8 simulated CPU devices for sharding tests, fp32 matmuls.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it lives here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

# Parity tests compare against fp32 PyTorch; keep XLA's CPU dots at full precision.
jax.config.update("jax_default_matmul_precision", "highest")
