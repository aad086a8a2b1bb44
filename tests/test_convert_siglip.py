"""`python -m convert {to-flax,to-hf} siglip`: bit-exact round trips through Orbax.

Sources: a transformers-5 SiglipVisionModel folder (fp32 and bf16, single file and
sharded), a transformers-4-style one (names under "vision_model."), and a full
SiglipModel (the text tower is skipped with a notice). Converted params must give the
transformers outputs (<= 1e-4 fp32), and the written folder must load in transformers.
"""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import SiglipConfig as HFSiglipConfig
from transformers import SiglipModel as HFSiglipModel
from transformers import SiglipVisionConfig
from transformers import SiglipVisionModel as HFSiglipVisionModel

from convert import safetensors_io
from convert.__main__ import main as convert_main
from metamorph_jax import pretrained
from metamorph_jax.models import siglip

TOLERANCE = 1e-4
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=24, patch_size=6)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every tensor (HF's init leaves biases at 0 and norms at 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def vision_model(seed: int = 0, **changes) -> HFSiglipVisionModel:
    torch.manual_seed(seed)
    return perturbed(HFSiglipVisionModel(SiglipVisionConfig(**{**VISION, **changes},
                                                            attn_implementation="eager")), seed)


def read_folder(folder) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors folder (single or sharded), as stored."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, load in safetensors_io.open_tensors(path).items():
            assert name not in tensors
            tensors[name] = np.array(load())
    return tensors


def assert_bit_exact(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]):
    assert sorted(ours) == sorted(reference)
    for name, array in reference.items():
        assert ours[name].dtype == array.dtype, name
        assert ours[name].shape == array.shape, name
        assert ours[name].tobytes() == array.tobytes(), f"{name} differs"


def cli(*args) -> None:
    assert convert_main([str(a) for a in args]) == 0


def flax_outputs(model_dir, images: np.ndarray) -> dict:
    saved = pretrained.read_model_config(model_dir)
    assert saved["model"] == "siglip"
    config = siglip.SiglipConfig.from_dict(saved["config"])
    params = jax.tree.map(jnp.asarray, pretrained.load_params(model_dir))
    model = siglip.SiglipVisionModel(config)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(images.transpose(0, 2, 3, 1)))


def images(batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 24, 24)).astype(np.float32)


def test_round_trip_fp32_with_parity(tmp_path):
    reference = vision_model()
    reference.save_pretrained(tmp_path / "hf")
    cli("to-flax", "siglip", tmp_path / "hf", tmp_path / "flax")

    pixels = images()
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels))
    ours = flax_outputs(tmp_path / "flax", pixels)
    assert np.abs(np.asarray(ours["last_hidden_state"]) - expected.last_hidden_state.numpy()).max() <= TOLERANCE
    assert np.abs(np.asarray(ours["pooler_output"]) - expected.pooler_output.numpy()).max() <= TOLERANCE

    cli("to-hf", "siglip", tmp_path / "flax", tmp_path / "back")
    assert_bit_exact(read_folder(tmp_path / "back"), read_folder(tmp_path / "hf"))
    reloaded = HFSiglipVisionModel.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert reloaded.config.to_dict()["hidden_size"] == VISION["hidden_size"]
    with torch.no_grad():
        again = reloaded(torch.from_numpy(pixels))
    assert torch.equal(again.pooler_output, expected.pooler_output)


def test_round_trip_bf16_sharded_without_head(tmp_path):
    reference = vision_model(seed=1, vision_use_head=False).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cli("to-flax", "siglip", tmp_path / "hf", tmp_path / "flax")
    params = pretrained.load_params(tmp_path / "flax")
    assert "head" not in params
    # Nothing is upcast: the Orbax tree holds the checkpoint's bf16.
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    cli("to-hf", "siglip", tmp_path / "flax", tmp_path / "back", "--max-shard-size", "20KB")
    assert_bit_exact(read_folder(tmp_path / "back"), read_folder(tmp_path / "hf"))


def test_transformers4_layout_with_vision_model_prefix(tmp_path):
    """transformers 4.x saved SiglipVisionModel tensors under "vision_model."."""
    reference = vision_model(seed=2)
    (tmp_path / "hf").mkdir()
    reference.config.to_json_file(tmp_path / "hf" / "config.json")
    save_file({f"vision_model.{k}": v.contiguous() for k, v in reference.state_dict().items()},
              tmp_path / "hf" / "model.safetensors")
    cli("to-flax", "siglip", tmp_path / "hf", tmp_path / "flax")
    cli("to-hf", "siglip", tmp_path / "flax", tmp_path / "back")
    original = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert_bit_exact(read_folder(tmp_path / "back"), original)


def test_full_siglip_model_vision_half(tmp_path, capsys):
    torch.manual_seed(3)
    full_config = HFSiglipConfig(
        vision_config=VISION,
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=8),
        attn_implementation="eager",
    )
    full = perturbed(HFSiglipModel(full_config), seed=3)
    full.save_pretrained(tmp_path / "hf")
    cli("to-flax", "siglip", tmp_path / "hf", tmp_path / "flax")
    notice = capsys.readouterr().out
    assert "skipped" in notice and "text_model." in notice and "logit_scale" in notice

    pixels = images(seed=3)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=torch.from_numpy(pixels))
    ours = flax_outputs(tmp_path / "flax", pixels)
    assert np.abs(np.asarray(ours["pooler_output"]) - expected.pooler_output.numpy()).max() <= TOLERANCE

    cli("to-hf", "siglip", tmp_path / "flax", tmp_path / "back")
    vision_half = {k[len("vision_model."):]: v for k, v in read_folder(tmp_path / "hf").items()
                   if k.startswith("vision_model.")}
    assert_bit_exact(read_folder(tmp_path / "back"), vision_half)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["model_type"] == "siglip_vision_model"
    reloaded = HFSiglipVisionModel.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        again = reloaded(torch.from_numpy(pixels))
    assert torch.equal(again.pooler_output, expected.pooler_output)


def test_vision_half_config_has_no_full_model_fields(tmp_path):
    full_config = HFSiglipConfig(vision_config=VISION, text_config=dict(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=50))
    HFSiglipModel(full_config).save_pretrained(tmp_path / "hf")
    cli("to-flax", "siglip", tmp_path / "hf", tmp_path / "flax")
    cli("to-hf", "siglip", tmp_path / "flax", tmp_path / "back")
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert not {"text_config", "vision_config", "logit_scale_init_value"} & set(written)


def test_bad_checkpoints_name_the_tensor(tmp_path, capsys):
    reference = vision_model(seed=4)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    reference.config.to_json_file(folder / "config.json")

    def attempt(tensors, *extra):
        for path in folder.glob("*.safetensors"):
            path.unlink()
        save_file(tensors, folder / "model.safetensors")
        code = convert_main(["to-flax", "siglip", str(folder), str(tmp_path / f"out{len(list(tmp_path.iterdir()))}"),
                             *extra])
        return code, capsys.readouterr().err

    missing = dict(state)
    del missing["encoder.layers.1.mlp.fc1.weight"]
    code, err = attempt(missing)
    assert code == 2 and "'encoder.layers.1.mlp.fc1.weight'" in err and "missing" in err

    wrong = dict(state, **{"head.attention.in_proj_weight": torch.zeros(90, 32)})
    code, err = attempt(wrong)
    assert code == 2 and "'head.attention.in_proj_weight'" in err and "(90, 32)" in err

    extra = dict(state, **{"encoder.layers.2.mlp.fc1.bias": torch.zeros(48)})
    code, err = attempt(extra)
    assert code == 2 and "'encoder.layers.2.mlp.fc1.bias'" in err

    both = dict(state, **{"vision_model.post_layernorm.bias": state["post_layernorm.bias"].clone()})
    code, err = attempt(both)
    assert code == 2 and "post_layernorm" in err and "twice" in err

    (folder / "config.json").write_text(json.dumps({**reference.config.to_dict(), "hidden_act": "relu"}))
    code, err = attempt(state)
    assert code == 2 and "config.json" in err and "hidden_act" in err


def test_pickle_needs_permission(tmp_path):
    reference = vision_model(seed=5)
    folder = tmp_path / "hf"
    folder.mkdir()
    reference.config.to_json_file(folder / "config.json")
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    assert convert_main(["to-flax", "siglip", str(folder), str(tmp_path / "refused")]) == 2
    cli("to-flax", "siglip", folder, tmp_path / "flax", "--allow-pickle")
    cli("to-hf", "siglip", tmp_path / "flax", tmp_path / "back")
    original = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert_bit_exact(read_folder(tmp_path / "back"), original)
