"""MetaMorph's visual-token reduction against torch's bilinear F.interpolate (fp32, <= 1e-6)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metamorph_jax.models import visual_tokens as vt

TOLERANCE = 1e-6


def _torch_reduce(tokens: np.ndarray, num_out: int, normalize: bool) -> np.ndarray:
    """The reference: [B, N, C] -> grid NCHW -> bilinear (no antialias) -> [B, M, C] -> F.normalize."""
    batch, num_in, channels = tokens.shape
    side_in, side_out = int(round(num_in**0.5)), int(round(num_out**0.5))
    grid = torch.tensor(np.array(tokens)).reshape(batch, side_in, side_in, channels).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(side_out, side_out), mode="bilinear", align_corners=False,
                            antialias=False)
    out = resized.permute(0, 2, 3, 1).reshape(batch, num_out, channels)
    if normalize:
        out = F.normalize(out, dim=-1)
    return out.numpy()


@pytest.mark.parametrize(
    "num_in, num_out",
    [(27 * 27, 64), (27 * 27, 27 * 27), (24 * 24, 64), (16 * 16, 4 * 4), (9 * 9, 7 * 7),
     (5 * 5, 12 * 12), (27 * 27, 1), (7 * 7, 100)],
)
@pytest.mark.parametrize("normalize", [False, True])
def test_reduction_matches_torch_bilinear(num_in, num_out, normalize):
    rng = np.random.default_rng(num_in * 1000 + num_out)
    tokens = (rng.standard_normal((3, num_in, 24)) * 2.0).astype(np.float32)
    expected = _torch_reduce(tokens, num_out, normalize)
    ours = np.asarray(jax.jit(vt.reduce_visual_tokens, static_argnums=(1, 2))(
        jnp.asarray(tokens), num_out, normalize))
    assert ours.shape == (3, num_out, 24)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)


def test_interpolation_weights_equal_torch_bit_for_bit():
    """Resizing one-hot rows through torch reads its weights out exactly; ours must be identical."""
    for size_in in range(1, 30):
        basis = torch.eye(size_in).reshape(size_in, 1, size_in, 1)
        for size_out in range(1, 30):
            torch_weights = F.interpolate(basis, size=(size_out, 1), mode="bilinear",
                                          align_corners=False)[:, 0, :, 0].T.numpy()
            np.testing.assert_array_equal(vt.bilinear_resize_matrix(size_in, size_out), torch_weights,
                                          err_msg=f"{size_in} -> {size_out}")


def test_bicubic_weights_match_torch():
    """Position-embedding resize weights: torch's bicubic to ~1 ulp of the weights."""
    for size_in in range(2, 30, 3):
        basis = torch.eye(size_in).reshape(size_in, 1, size_in, 1)
        for size_out in range(2, 40, 3):
            torch_weights = F.interpolate(basis, size=(size_out, 1), mode="bicubic",
                                          align_corners=False)[:, 0, :, 0].T.numpy()
            np.testing.assert_allclose(vt.bicubic_resize_matrix(size_in, size_out), torch_weights,
                                       rtol=0, atol=2e-6, err_msg=f"{size_in} -> {size_out}")


def test_jax_image_resize_would_not_match():
    """Why the resize is hand-written: jax.image.resize antialiases when downsampling."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((1, 27 * 27, 8)).astype(np.float32)
    expected = _torch_reduce(tokens, 64, normalize=False)
    naive = jax.image.resize(jnp.asarray(tokens).reshape(1, 27, 27, 8), (1, 8, 8, 8), "bilinear")
    assert np.abs(np.asarray(naive).reshape(1, 64, 8) - expected).max() > 1e-2
    ours = vt.reduce_visual_tokens(jnp.asarray(tokens), 64, normalize=False)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=TOLERANCE)


def test_bf16_input_is_reduced_in_fp32():
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((2, 27 * 27, 16)).astype(np.float32)
    as_bf16 = jnp.asarray(tokens, jnp.bfloat16)
    expected = _torch_reduce(np.asarray(as_bf16.astype(jnp.float32)), 64, normalize=True)
    ours = vt.reduce_visual_tokens(as_bf16, 64)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ours), axis=-1), 1.0, atol=1e-6)


def test_zero_token_normalises_to_zero_like_torch():
    tokens = np.zeros((1, 4, 3), np.float32)
    ours = np.asarray(vt.reduce_visual_tokens(jnp.asarray(tokens), 1))
    np.testing.assert_array_equal(ours, _torch_reduce(tokens, 1, normalize=True))


@pytest.mark.parametrize("num_in", [27 * 26, 730, 2])
def test_non_square_source_is_rejected(num_in):
    tokens = jnp.zeros((1, num_in, 4), jnp.float32)
    with pytest.raises(ValueError, match=rf"input token count \(tokens.shape\[1\]\)={num_in} is not a square"):
        vt.reduce_visual_tokens(tokens, 64)


@pytest.mark.parametrize("num_out", [63, 0, 8])
def test_non_square_target_is_rejected(num_out):
    with pytest.raises(ValueError, match=f"num_tokens_out={num_out} is not a square"):
        vt.reduce_visual_tokens(jnp.zeros((1, 729, 4), jnp.float32), num_out)


def test_wrong_rank_is_rejected():
    with pytest.raises(ValueError, match=r"\[batch, tokens, channels\]"):
        vt.reduce_visual_tokens(jnp.zeros((1, 27, 27, 4), jnp.float32), 64)
