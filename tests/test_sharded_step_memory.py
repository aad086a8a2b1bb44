"""The sharded text train step keeps every device's activations to its own rows.

Compiled on 8 simulated devices (fsdp=8; data=2 x fsdp=4), no per-device array of the
partitioned program may span more tokens than the device's share of the batch: an array
with the vocabulary axis (logits, their gradient, the softmax) over all rows is what took a
LLaMA-3-8B step to 252 GB per chip when the activation constraints were dropped.
"""
import importlib.util
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph_jax import pretrained, sharding, tiny
from metamorph_jax.models.llama import LlamaForCausalLM
from metamorph_jax.training import objectives, optim, state as state_lib, steps as steps_lib

REPO = Path(__file__).resolve().parents[1]
# A prime vocabulary no other axis uses, so every array carrying it is a logits-like
# array (or the LM head / embedding). hidden_size (32) stays below the per-device token
# share (48): a gathered [hidden, vocab] weight must not read as too many tokens.
VOCAB, HIDDEN, BATCH, LENGTH = 4099, 32, 8, 48
SHAPE = re.compile(r"\b(?:pred|s8|u8|s32|u32|bf16|f16|f32)\[([\d,]*)\]")


def vocab_arrays(hlo: str) -> list[tuple[int, ...]]:
    """The shapes in HLO text that have an axis of VOCAB entries."""
    shapes = (tuple(int(d) for d in match.split(",")) for match in SHAPE.findall(hlo) if match)
    return [shape for shape in shapes if VOCAB in shape]


@pytest.fixture(scope="module")
def text_stage(tmp_path_factory):
    """The text stage of configs/text_tiny.py on a tiny LLaMA folder with a prime vocabulary."""
    root = tmp_path_factory.mktemp("memory")
    tokenizer = tiny.tiny_tokenizer(root / "llm")
    cfg = tiny.tiny_llama_config(tokenizer, vocab_size=VOCAB, hidden_size=HIDDEN,
                                 intermediate_size=64, head_dim=8, remat_policy="full")
    dummy = np.zeros((1, 1), np.int32)
    params = jax.eval_shape(lambda: LlamaForCausalLM(cfg).init(jax.random.key(0), dummy,
                                                               positions=dummy))["params"]
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.unbox(params))
    pretrained.save_pretrained(root / "llm", "llama", cfg.to_dict(), params)
    spec = importlib.util.spec_from_file_location("text_tiny", REPO / "configs" / "text_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stage = module.get_config().stages.text
    stage.init.llm_dir = str(root / "llm")
    stage.init.tokenizer_dir = str(root / "llm")
    stage.remat_policy = "full"
    return stage


def compiled_train_step(stage, mesh) -> str:
    """The runner's text train step (runner.Stage.compile), lowered on abstract shapes."""
    objective = objectives.build(stage, "text", None)
    optimizer, schedule = optim.build_optimizer(stage.optim, int(stage.steps))
    boxed = state_lib.abstract_state(*objective.boxed_parts(), optimizer)
    shardings = state_lib.state_shardings(boxed, mesh, objective.rules)
    abstract = state_lib.with_shardings(state_lib.unboxed(boxed), shardings)
    batch = {key: jax.ShapeDtypeStruct((1, BATCH, LENGTH), jnp.int32,
                                       sharding=steps_lib.batch_sharding(mesh, objective.rules, 3))
             for key in objective.batch_keys}
    train = steps_lib.make_train_step(objective, optimizer, schedule, skip_nonfinite=False)
    step = steps_lib.jit_train_step(train, mesh, shardings, objective.rules,
                                    {key: 3 for key in objective.batch_keys})
    return step.lower(abstract, batch).compile().as_text()


def test_vocab_arrays_are_recognised():
    hlo = "%a = f32[1,48,4099]{2,1,0} fusion(), %b = pred[384,4099] x, %c = f32[4099,32] y"
    assert vocab_arrays(hlo) == [(1, 48, VOCAB), (384, VOCAB), (VOCAB, HIDDEN)]


@pytest.mark.parametrize("shape", [dict(data=1, fsdp=8), dict(data=2, fsdp=4)],
                         ids=["fsdp8", "data2-fsdp4"])
def test_no_device_holds_logits_of_other_devices_rows(text_stage, shape):
    mesh = sharding.make_mesh(**shape, tensor=1)
    share = BATCH * LENGTH // mesh.devices.size
    shapes = vocab_arrays(compiled_train_step(text_stage, mesh))
    assert (1, LENGTH, VOCAB) in shapes, "the per-device logits were not found in the HLO"
    too_wide = sorted({shape for shape in shapes if np.prod(shape) // VOCAB > share})
    assert not too_wide, (f"per-device arrays span more than this device's {share} tokens "
                          f"(x {VOCAB} vocab): {too_wide}")
