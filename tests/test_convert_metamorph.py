"""The authors' MetaMorph checkpoint <-> our model folder (convert/metamorph.py).

A tiny authors'-format folder is built here: a transformers LlamaForCausalLM state dict plus
the adapter, vision head, unused vision_proj and (optionally) SigLIP tower tensors under the
authors' names, saved as safetensors beside a metamorph_llama config.json.
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.torch import load_file, save_file

from convert.__main__ import main
from convert.core import ConversionError
from convert.metamorph import TOWER_PREFIX, checkpoint_to_flax
from metamorph_jax import pretrained
from metamorph_jax.data import conversation, packing
from metamorph_jax.data.testing import build_tiny_tokenizer
from metamorph_jax.models import metamorph
from metamorph_jax.training import vpit_loss
from tests.metamorph_reference import (IMAGE_SIZE, TOKENS_PER_IMAGE, VISION_COEF, TorchMetaMorph,
                                       authors_hf_config, render_samples)

TOLERANCE = 1e-5


def write_authors_folder(path, reference, hf_config, with_tower=True):
    state = {k: v.detach().clone().contiguous() for k, v in reference.authors_state_dict().items()
             if with_tower or not k.startswith(TOWER_PREFIX)}
    generator = torch.Generator().manual_seed(1)
    d = hf_config["hidden_size"]
    state["model.vision_proj.weight"] = torch.randn(d, 64, generator=generator)
    state["model.vision_proj.bias"] = torch.randn(d, generator=generator)
    path.mkdir()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config))
    return state


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metamorph")
    tokenizer = build_tiny_tokenizer()
    ids = conversation.add_image_tokens(tokenizer)
    hf_config = authors_hf_config(ids.vocab_size)
    reference = TorchMetaMorph(hf_config)
    state = write_authors_folder(root / "authors", reference, hf_config)
    reference.tower.save_pretrained(root / "siglip")
    # The authors' config.json does not describe the tower: --vision-tower gives its config.
    assert main(["to-flax", "metamorph", str(root / "authors"), str(root / "flax"),
                 "--vision-tower", str(root / "siglip")]) == 0
    return dict(root=root, reference=reference, hf_config=hf_config, state=state, ids=ids,
                samples=render_samples(tokenizer, ids))


def test_converted_model_matches_the_torch_reference(folders):
    saved = pretrained.read_model_config(folders["root"] / "flax")
    assert saved["model"] == "metamorph" and saved["hf_config"] == folders["hf_config"]
    config = metamorph.MetaMorphConfig.from_dict(saved["config"])
    assert config.vision_coef == VISION_COEF and config.num_image_tokens == TOKENS_PER_IMAGE
    params = jax.tree.map(jnp.asarray, pretrained.load_params(folders["root"] / "flax"))
    sample = folders["samples"]["edit_two_turns"]  # a prompt image, a response image, text
    batch = packing.empty_batch(1, len(sample["tokens"]), 2, IMAGE_SIZE)
    packing.fill_row(batch, 0, [sample], TOKENS_PER_IMAGE)
    model = metamorph.MetaMorph(config)
    loss, metrics = jax.jit(lambda p, b: vpit_loss.vpit_loss(model, p, b))(
        params, {k: jnp.asarray(v) for k, v in packing.device_fields(batch).items()})
    with torch.no_grad():
        text_sum, text_count, vision_sum, vision_count = folders["reference"].sample_sums(
            sample["tokens"], sample["images"], sample["text_mask"], folders["ids"].image_start_id)
    expected = float(text_sum) / text_count + VISION_COEF * float(vision_sum) / vision_count
    assert vision_count == TOKENS_PER_IMAGE == int(metrics["vision_tokens"])
    print(f"converted model: loss {float(loss):.6f}, error {abs(float(loss) - expected):.2e}")
    assert abs(float(loss) - expected) <= TOLERANCE


def test_round_trip_is_bit_exact_and_loads_in_transformers(folders, capsys):
    root = folders["root"]
    assert main(["to-hf", "metamorph", str(root / "flax"), str(root / "hf")]) == 0
    written = load_file(str(root / "hf" / "model.safetensors"))
    source = {k: v for k, v in folders["state"].items() if not k.startswith("model.vision_proj.")}
    assert sorted(written) == sorted(source)
    for name, tensor in source.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name

    config = json.loads((root / "hf" / "config.json").read_text())
    for field, value in folders["hf_config"].items():  # the authors' fields survive
        assert config[field] == value, field
    assert config["image_start_id"] == folders["ids"].image_start_id

    # transformers reads the folder as a plain LLaMA; the MetaMorph tensors are reported unused.
    llama, info = transformers.LlamaForCausalLM.from_pretrained(root / "hf",
                                                                 output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert "model.mm_projector.0.weight" in info["unexpected_keys"]
    assert "vision_head.2.bias" in info["unexpected_keys"]
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        np.testing.assert_array_equal(llama(tokens).logits.numpy(),
                                      folders["reference"].llama(tokens).logits.numpy())

    # Our own to-hf output converts back without --vision-tower (its vision_config field).
    capsys.readouterr()
    checkpoint_to_flax(root / "hf", root / "flax_again", progress=False)
    first = traverse_util.flatten_dict(pretrained.load_params(root / "flax"))
    again = traverse_util.flatten_dict(pretrained.load_params(root / "flax_again"))
    assert first.keys() == again.keys()
    for path in first:
        np.testing.assert_array_equal(first[path], again[path], err_msg="/".join(path))


def test_tower_from_the_vision_tower_folder(folders, tmp_path, capsys):
    write_authors_folder(tmp_path / "authors", folders["reference"], folders["hf_config"],
                         with_tower=False)
    checkpoint_to_flax(tmp_path / "authors", tmp_path / "flax",
                       vision_tower=folders["root"] / "siglip", progress=False)
    assert "model.vision_proj." in capsys.readouterr().out  # the unused Linear, with a notice
    ours = traverse_util.flatten_dict(pretrained.load_params(tmp_path / "flax"))
    full = traverse_util.flatten_dict(pretrained.load_params(folders["root"] / "flax"))
    assert ours.keys() == full.keys()
    for path in full:
        np.testing.assert_array_equal(ours[path], full[path], err_msg="/".join(path))


def test_a_missing_tower_is_a_clear_error(folders, tmp_path, capsys):
    write_authors_folder(tmp_path / "authors", folders["reference"], folders["hf_config"],
                         with_tower=False)
    with pytest.raises(ConversionError, match="no vision tower tensors .*pass --vision-tower"):
        checkpoint_to_flax(tmp_path / "authors", tmp_path / "out", progress=False)


@pytest.mark.parametrize("tower_name,message", [
    # So400m by name, but the tensors are the tiny tower's: the widths disagree.
    ("google/siglip-so400m-patch14-384", "'mm_hidden_size' = 24 differs"),
    # Not So400m and no vision_config: the tower's architecture is unknown.
    ("my/own-siglip", "'mm_vision_tower' = 'my/own-siglip'.*pass --vision-tower"),
])
def test_an_unknown_tower_config_is_a_clear_error(folders, tmp_path, capsys, tower_name, message):
    hf_config = {**folders["hf_config"], "mm_vision_tower": tower_name}
    write_authors_folder(tmp_path / "authors", folders["reference"], hf_config)
    assert main(["to-flax", "metamorph", str(tmp_path / "authors"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "config.json" in error
    assert re.search(message, error), error


def test_vision_tower_flag_is_for_metamorph_only(tmp_path, capsys):
    assert main(["to-flax", "llama", str(tmp_path), str(tmp_path / "o"),
                 "--vision-tower", "x"]) == 2
    assert capsys.readouterr().err == "error: --vision-tower is for metamorph only\n"


def test_bf16_checkpoint_round_trips_bit_exact(folders, tmp_path):
    """The authors train in bf16: the stored dtype is kept both ways, nothing upcast."""
    state = {k: v.to(torch.bfloat16) for k, v in folders["reference"].authors_state_dict().items()}
    (tmp_path / "authors").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()},
              str(tmp_path / "authors" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "authors" / "config.json").write_text(json.dumps(folders["hf_config"]))
    checkpoint_to_flax(tmp_path / "authors", tmp_path / "flax",
                       vision_tower=folders["root"] / "siglip", progress=False)
    params = traverse_util.flatten_dict(pretrained.load_params(tmp_path / "flax"))
    assert {str(v.dtype) for v in params.values()} == {"bfloat16"}
    assert main(["to-hf", "metamorph", str(tmp_path / "flax"), str(tmp_path / "hf")]) == 0
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(written) == sorted(state)
    for name, tensor in state.items():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], tensor), name
