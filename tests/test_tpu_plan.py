"""A train step compiled (never run) on this CPU for a TPU topology traces the TPU paths.

Needs libtpu (requirements-tpu.txt), which compiles for a TPU topology described by
jax.experimental.topologies without any TPU attached. The model is built for the mesh's
platform (sharding.mesh_platform), so the kernels follow the devices the step is compiled
for, not this process's CPU backend.
"""
import re

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu "
                    "(pip install -r requirements-tpu.txt)")

from metamorph_jax import sharding  # noqa: E402
from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from metamorph_jax.training import objectives, optim, plan  # noqa: E402
from metamorph_jax.training import state as state_lib, steps as steps_lib  # noqa: E402

TOPOLOGY = "v5e-4"  # v5e:2x2, 4 chips: fsdp 2 x tensor 2
BATCH, LENGTH = 4, 1024
CONFIG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=64, dtype="bfloat16",
                     remat_policy="dots")
# The splash kernels of a causal, packed (segmented) forward and its two backward passes.
SPLASH_KERNELS = ("splash_mha_fwd_segmented", "splash_mha_dq_segmented",
                  "splash_mha_dkv_segmented")


def tpu_mesh():
    devices = plan.topology_devices(plan.parse_topology(TOPOLOGY))
    return sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=devices)


class PlannedText(objectives.TextObjective):
    """The text stage's objective on a model built in the test (no model folder)."""

    def __init__(self, model):
        self.model, self.name, self.where = model, "text", "stage 'text'"


def lower_train_step(model, mesh):
    """The runner's text train step (steps.make_train_step), lowered on abstract shapes."""
    sharding.check_platform(model.config.platform, mesh)
    objective = PlannedText(model)
    optimizer, schedule = optim.build_optimizer(dict(lr=1e-4, schedule="constant"), 10)
    boxed = state_lib.abstract_state(*objective.boxed_parts(), optimizer)
    shardings = state_lib.state_shardings(boxed, mesh, objective.rules)
    state = state_lib.with_shardings(state_lib.unboxed(boxed), shardings)
    batch = {key: jax.ShapeDtypeStruct((1, BATCH, LENGTH), jnp.int32,
                                       sharding=steps_lib.batch_sharding(mesh, objective.rules, 3))
             for key in objective.batch_keys}
    step = steps_lib.jit_train_step(
        steps_lib.make_train_step(objective, optimizer, schedule, skip_nonfinite=False), mesh,
        shardings, objective.rules, {key: 3 for key in objective.batch_keys})
    # conftest.py asks for fp32 products ("highest") for the CPU parity tests; under it
    # Mosaic refuses the splash kernels' bf16 products ("Bad lhs type"). A run's default.
    with jax.default_matmul_precision("default"):
        return step.lower(state, batch)


@pytest.mark.slow
def test_tpu_plan_compiles_splash_attention_and_no_cpu_paths():
    mesh = tpu_mesh()
    assert sharding.mesh_platform(mesh) == "tpu"
    model = LlamaForCausalLM(CONFIG.replace(platform=sharding.mesh_platform(mesh)))
    lowered = lower_train_step(model, mesh)
    hlo = lowered.compile().as_text()
    assert "tpu_custom_call" in hlo
    for kernel in SPLASH_KERNELS:
        assert kernel in hlo, f"no {kernel} kernel in the compiled step"
    # Each kernel sees one shard: 2 rows (4 over fsdp 2) and 2 query heads (4 over tensor 2).
    assert f"bf16[2,2,{LENGTH},{CONFIG.head_dim}]" in hlo
    # No [.., T, T] array anywhere: neither a materialised mask nor full score matrices
    # (the XLA kernel, or the CPU's stacked attention).
    assert not re.search(rf"\[[0-9,]*{LENGTH},{LENGTH}\]", hlo)
    # Before XLA's passes: the rotary tables' barrier only, none of the CPU backwards'
    # (dense_matmul's, stacked_attention's transposes behind barriers).
    assert lowered.as_text().count("optimization_barrier") == 1


def test_model_built_for_another_platform_is_refused():
    # A model left to jax.default_backend() (this CPU) cannot be planned for TPUs: its
    # kernels would be the CPU's.
    mesh = tpu_mesh()
    with pytest.raises(ValueError, match="built for platform 'cpu'.*mesh's devices are 'tpu'"):
        lower_train_step(LlamaForCausalLM(CONFIG), mesh)


@pytest.mark.slow
def test_decoder_plan_traces_splash_attention_not_the_cpu_einsums(tmp_path):
    # configs/tiny.py's decoder stage as `train.py --plan` compiles it: its UNet's
    # self-attention over the 16 x 16 pixels (256 tokens) takes splash attention on TPUs;
    # built for this CPU it would hold the [.., 256, 256] score arrays of the einsums.
    from pathlib import Path

    from metamorph_jax import architectures
    from metamorph_jax.training import runner
    repo = Path(__file__).resolve().parents[1]
    architectures.register("test_tpu_siglip", "siglip", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        image_size=16, patch_size=4, use_head=False, num_visual_tokens=4))
    try:
        config = runner.parse_flags(["train.py", "--config",
                                     f"{repo / 'configs' / 'tiny.py'}:{tmp_path / 'none'}",
                                     "--config.order=('decoder',)"])
        with config.unlocked():
            config.stages.decoder.init.vision_arch = "test_tpu_siglip"
        stage = plan._stage(config, 0, "decoder", tpu_mesh(), processes=1)
        assert stage.objective.model.platform == "tpu"
        hlo = plan._compile(stage).as_text()
    finally:
        architectures.ARCHITECTURES.pop("test_tpu_siglip", None)
    pixels = config.stages.decoder.model.image_size ** 2
    assert pixels == 256
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert kernel in hlo, f"no {kernel} kernel in the compiled decoder step"
    assert not re.search(rf"\[[0-9,]*{pixels},{pixels}\]", hlo)
