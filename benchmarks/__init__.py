"""Speed and memory scripts; run from the repo root as `python -m benchmarks.NAME`.

Importing the package (which `python -m benchmarks.NAME` does before the script imports
JAX) starts the process as the commands do (metamorph_jax/platforms.py: the CPU where
libtpu is installed without a TPU, instead of libtpu's initialisation errors first).
"""
from metamorph_jax import platforms

platforms.quiet_start()
