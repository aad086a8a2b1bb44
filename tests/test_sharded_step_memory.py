"""The sharded text train step keeps every device's activations to its own rows.

Compiled on 8 simulated devices (fsdp=8; data=2 x fsdp=4), no per-device array of the
partitioned program may span more tokens than the device's share of the batch: an array
with the vocabulary axis (logits, their gradient, the softmax) over all rows is what took a
LLaMA-3-8B step to 252 GB per chip when the activation constraints were dropped.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metamorph_jax import sharding
from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM
from metamorph_jax.training import text_step

# A prime vocabulary no other axis uses, so every array carrying it is a logits-like
# array (or the LM head / embedding). hidden_size (32) stays below the per-device token
# share (48): a gathered [hidden, vocab] weight must not read as too many tokens.
VOCAB, HIDDEN, BATCH, LENGTH = 4099, 32, 8, 48
SHAPE = re.compile(r"\b(?:pred|s8|u8|s32|u32|bf16|f16|f32)\[([\d,]*)\]")


def vocab_arrays(hlo: str) -> list[tuple[int, ...]]:
    """The shapes in HLO text that have an axis of VOCAB entries."""
    shapes = (tuple(int(d) for d in match.split(",")) for match in SHAPE.findall(hlo) if match)
    return [shape for shape in shapes if VOCAB in shape]


def compiled_train_step(mesh) -> str:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, scan_layers=True,
                      remat_policy="full")
    model = LlamaForCausalLM(cfg)
    optimizer = optax.adamw(1e-3)
    shardings = text_step.state_shardings(model, optimizer, mesh)
    abstract = jax.eval_shape(lambda p: text_step.TrainState.create(nn.unbox(p), optimizer),
                              text_step.abstract_boxed_params(model))
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {key: jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32, sharding=batch_sharding)
             for key in text_step.TEXT_BATCH_KEYS}
    step = text_step.jit_train_step(text_step.make_train_step(model, optimizer), mesh, shardings)
    return step.lower(abstract, batch).compile().as_text()


def test_vocab_arrays_are_recognised():
    hlo = "%a = f32[1,48,4099]{2,1,0} fusion(), %b = pred[384,4099] x, %c = f32[4099,32] y"
    assert vocab_arrays(hlo) == [(1, 48, VOCAB), (384, VOCAB), (VOCAB, HIDDEN)]


@pytest.mark.parametrize("shape", [dict(data=1, fsdp=8), dict(data=2, fsdp=4)],
                         ids=["fsdp8", "data2-fsdp4"])
def test_no_device_holds_logits_of_other_devices_rows(shape):
    mesh = sharding.make_mesh(**shape, tensor=1)
    share = BATCH * LENGTH // mesh.devices.size
    shapes = vocab_arrays(compiled_train_step(mesh))
    assert (1, LENGTH, VOCAB) in shapes, "the per-device logits were not found in the HLO"
    too_wide = sorted({shape for shape in shapes if np.prod(shape) // VOCAB > share})
    assert not too_wide, (f"per-device arrays span more than this device's {share} tokens "
                          f"(x {VOCAB} vocab): {too_wide}")
