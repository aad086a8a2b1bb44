"""The LLaMA decoder on 8 simulated CPU devices: sharded params, same logits."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.models.llama import LlamaConfig
import pytest

from metamorph_jax import sharding
from metamorph_jax.models.llama import LlamaForCausalLM
from tests.helpers import tiny_llama_hf_config


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape", [dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=8, tensor=1)],
                         ids=["2x2x2", "fsdp8"])
def test_sharded_forward_equals_single_device(shape):
    cfg = LlamaConfig.from_hf(tiny_llama_hf_config(vocab_size=96))
    model = LlamaForCausalLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (8, 16)))
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    boxed = model.init(jax.random.key(0), tokens[:1], positions=positions[:1])["params"]
    params = nn.unbox(boxed)
    expected = model.apply({"params": params}, tokens, positions=positions).logits

    mesh = sharding.make_mesh(**shape)
    param_shardings = sharding.logical_shardings(boxed, mesh)
    sharded = jax.device_put(params, param_shardings)
    embed = sharded["embed_tokens"]["embedding"]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    data_sharding = sharding.batch_sharding(mesh)

    # The activation constraints apply only under jax.set_mesh (sharding.activate).
    @jax.jit
    def forward(p, t, pos):
        return model.apply({"params": p}, t, positions=pos).logits
    with sharding.activate(mesh):
        out = forward(sharded, jax.device_put(tokens, data_sharding),
                      jax.device_put(positions, data_sharding))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("shape,message", [(dict(data=3, fsdp=-1), "divide"),
                                           (dict(data=2, fsdp=2, tensor=4), "needs 16 devices"),
                                           (dict(data=-1, fsdp=-1), "at most one")])
def test_impossible_meshes_are_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(**shape)


def test_init_under_mesh_and_rules_with_multi_axis_kernels():
    """Initialising inside a mesh with rules constrains every kernel at its full rank."""
    cfg = LlamaConfig.from_hf(tiny_llama_hf_config(vocab_size=96))
    model = LlamaForCausalLM(cfg)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    tokens = jnp.zeros((2, 8), jnp.int32)

    @jax.jit
    def init(key):
        return model.init(key, tokens, positions=tokens)["params"]
    with sharding.activate(mesh):
        boxed = init(jax.random.key(0))
    q = boxed["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.value.shape == (cfg.num_layers, 32, 4, 8)
    assert q.names == ("layers", "embed", "heads", "head_dim")


def test_a_dimension_the_mesh_does_not_divide_stays_whole():
    """LLaMA-3's vocabulary plus the two image tokens (128258 rows) on tensor=4: the rows
    stay whole, the embed axis is still sharded over fsdp; divisible tables are untouched."""
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    boxed = {
        "odd": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((10, 8), jnp.float32),
                                       ("vocab", "embed")),
        "even": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((12, 8), jnp.float32),
                                        ("vocab", "embed")),
    }
    placed = sharding.logical_shardings(boxed, mesh)
    assert placed["odd"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert placed["even"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    # and it can be placed: device_put of the odd table onto its sharding
    table = jax.device_put(np.ones((10, 8), np.float32), placed["odd"])
    assert table.addressable_shards[0].data.shape == (10, 4)
