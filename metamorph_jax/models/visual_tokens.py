"""MetaMorph's visual tokens: a square token grid resized bilinearly, then L2-normalised.

MetaMorph takes SigLIP's 27x27 = 729 patch tokens, resizes the grid to 8x8 with
PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing)
in fp32, and L2-normalises every token. ``jax.image.resize`` antialiases when it
downsamples, so it gives different numbers; here the resize is written out as two
small interpolation matrices (one per spatial axis) whose weights follow PyTorch's
source-index rule, which makes the result match PyTorch to fp32 rounding.

Everything here is pure jnp on arrays shaped [batch, tokens, channels]; the weight
matrices depend only on static shapes and are built with numpy at trace time. The
bicubic matrix (torch's bicubic F.interpolate) lives here too, beside its bilinear
sibling; siglip.py uses it to resize position embeddings.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# F.normalize's default: the norm is clamped below by this before dividing.
L2_EPSILON = 1e-12


def grid_side(num_tokens: int, what: str = "num_tokens") -> int:
    """The side of a square token grid with ``num_tokens`` tokens.

    Raises ValueError naming ``what`` when ``num_tokens`` is not a positive perfect square.
    """
    side = math.isqrt(num_tokens) if num_tokens > 0 else 0
    if side * side != num_tokens or side == 0:
        raise ValueError(
            f"{what}={num_tokens} is not a square token grid: visual-token reduction needs "
            f"a square number of tokens (e.g. 729 = 27x27 in, 64 = 8x8 out)"
        )
    return side


def torch_source_index(in_size: int, out_size: int) -> np.ndarray:
    """fp32 source coordinates ``(dst + 0.5) * (in/out) - 0.5`` rounded as PyTorch's CPU kernel.

    The fp32 scale times the fp32 ``dst + 0.5`` minus 0.5 is rounded to fp32 once (a
    fused multiply-add); rounding the product first moves some weights by an ulp,
    which shows as ~5e-6 errors on unit-scale features.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # float64 holds the fp32 x fp32 product exactly, so this is one rounding, as FMA.
    return (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The [out_size, in_size] fp32 matrix of 1-D linear interpolation as PyTorch does it.

    Follows ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``
    with an output size (not a scale factor): source coordinate
    ``(dst + 0.5) * in/out - 0.5`` (see torch_source_index), clamped below at 0, then the
    two neighbours ``floor(src)`` and ``min(floor(src) + 1, in - 1)`` weighted by
    ``1 - frac`` and ``frac``.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"resize sizes must be positive, got in_size={in_size}, out_size={out_size}")
    src = torch_source_index(in_size, out_size)
    src = np.maximum(src, np.float32(0.0))
    low = np.floor(src).astype(np.int64)
    low = np.minimum(low, in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = (src - low.astype(np.float32)).astype(np.float32)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    # When low == high (right border) the two weights land on the same column and sum to 1.
    np.add.at(matrix, (rows, low), np.float32(1.0) - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights (A = -0.75, PyTorch's bicubic) for offsets -1, 0, 1, 2."""
    a = np.float32(-0.75)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1).astype(np.float32)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of torch's bicubic F.interpolate (align_corners=False).

    Source coordinate ``(dst + 0.5) * in/out - 0.5`` (not clamped, unlike bilinear),
    four taps at floor-1 .. floor+2 clamped to the border, Keys weights with A = -0.75.
    Matches torch's weights to ~1e-6 (not bit for bit: torch rounds the cubic
    polynomials differently); used for position embeddings, not visual tokens.
    """
    src = torch_source_index(in_size, out_size)
    base = np.floor(src)
    weights = _cubic_weights((src - base).astype(np.float32))
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    for tap in range(4):
        cols = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (rows, cols), weights[:, tap])
    return matrix


def resize_token_grid(tokens: jnp.ndarray, num_tokens_out: int) -> jnp.ndarray:
    """Bilinearly resize a square grid of tokens, exactly as torch's bilinear F.interpolate.

    Args:
      tokens: [batch, side_in**2, channels], row-major over the grid (SigLIP's patch order).
      num_tokens_out: a perfect square, e.g. 64 for an 8x8 grid.

    Returns:
      [batch, num_tokens_out, channels] in fp32 (the resize is always computed in fp32).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [batch, tokens, channels], got shape {tokens.shape}")
    batch, num_in, channels = tokens.shape
    side_in = grid_side(num_in, "input token count (tokens.shape[1])")
    side_out = grid_side(num_tokens_out, "num_tokens_out")
    grid = tokens.astype(jnp.float32).reshape(batch, side_in, side_in, channels)
    if side_in == side_out:
        # PyTorch copies the input through unchanged when the size does not change.
        return grid.reshape(batch, num_tokens_out, channels)
    weights = jnp.asarray(bilinear_resize_matrix(side_in, side_out))
    # Separable: rows first, then columns; HIGHEST keeps the fp32 products exact on TPU/GPU too.
    resized = jnp.einsum("oh,bhwc->bowc", weights, grid, precision="highest")
    resized = jnp.einsum("pw,bowc->bopc", weights, resized, precision="highest")
    return resized.reshape(batch, num_tokens_out, channels)


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = L2_EPSILON) -> jnp.ndarray:
    """x / max(||x||_2, eps) along ``axis`` in fp32, as torch's F.normalize."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def reduce_visual_tokens(
    tokens: jnp.ndarray, num_tokens_out: int = 64, normalize: bool = True
) -> jnp.ndarray:
    """MetaMorph's visual tokens from encoder features: square-grid resize, then L2 norm.

    Args:
      tokens: [batch, side**2, channels] encoder features (SigLIP: the last layer's
        output before the post-layernorm).
      num_tokens_out: tokens per image after the reduction (a perfect square).
      normalize: L2-normalise every output token.

    Returns:
      [batch, num_tokens_out, channels] fp32.
    """
    reduced = resize_token_grid(tokens, num_tokens_out)
    return l2_normalize(reduced) if normalize else reduced
