"""Each remat policy saves what it claims, with the CPU's custom-VJP dense layers
(layers.dense_matmul) as with the plain products other platforms get.

A name- or primitive-based policy only sees what is traced inside the remat'd layer; a
custom VJP could hide its products from it. Measured with jax 0.10.2: it does not (the
custom VJP's forward rule is traced into the layer, and its dot_generals are saved like
the plain ones), and these tests keep it so.
"""
import contextlib
import io
from collections import Counter

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals

from metamorph_jax.models import layers
from metamorph_jax.models.llama import LlamaConfig, LlamaDecoderLayer

# Widths chosen so that every projection's output has its own shape.
CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=12, attention_impl="reference")
BATCH, LENGTH = 2, 16


def saved(policy: str, platform: str) -> list[tuple[str, str]]:
    """(type, origin) of each residual the layer's backward reads that the forward
    computed (arguments and constants left out), from jax's print_saved_residuals."""
    cfg = CONFIG.replace(platform=platform)
    layer = layers.maybe_remat(LlamaDecoderLayer, policy)(cfg)
    x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, cfg.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
    rope = layers.rotary_tables(positions, layers.rope_inverse_frequencies(
        cfg.head_dim, cfg.rope_theta), jnp.float32)
    segments = jnp.ones((BATCH, LENGTH), jnp.int32)
    params = layer.init(jax.random.key(1), x, rope, segments, None, None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(
            lambda p, x: layer.apply(p, x, rope, segments, None, None)[0].sum(), params, x)
    lines = [line for line in out.getvalue().splitlines()
             if "from the argument" not in line and "from a constant" not in line]
    return [(line.split(" ")[0], line.split(" from ")[0].split(" ", 1)[1]) for line in lines]


def projection_outputs() -> Counter:
    """The dense outputs the backward needs: q, k, v, o, gate and up (down_proj's output
    only feeds the residual sum, whose backward does not read it)."""
    c = CONFIG
    widths = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
              c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size,
              c.intermediate_size]
    return Counter((f"f32[{BATCH},{LENGTH},{w}]", "output of dot_general") for w in widths)


@pytest.mark.parametrize("policy", sorted(layers.REMAT_POLICIES))
def test_custom_vjp_dense_saves_as_plain_dense(policy):
    assert saved(policy, "cpu") == saved(policy, "tpu")


def test_full_saves_nothing_computed():
    assert saved("full", "cpu") == []


def test_dots_saves_every_product():
    residuals = Counter(saved("dots", "cpu"))
    assert all(origin == "output of dot_general" for _, origin in residuals), residuals
    assert not projection_outputs() - residuals, "a projection output is recomputed"
    # Beside the projections: attention's two products (scores, weighted values).
    assert sum((residuals - projection_outputs()).values()) == 2, residuals


def test_dots_no_batch_saves_the_projections_only():
    assert Counter(saved("dots_no_batch", "cpu")) == projection_outputs()


def test_everything_saves_more_than_products():
    residuals = Counter(saved("everything", "cpu"))
    assert any(origin != "output of dot_general" for _, origin in residuals)
    assert len(residuals) > len(projection_outputs())
