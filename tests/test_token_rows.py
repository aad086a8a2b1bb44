"""New vocabulary rows (MetaMorph's <image_start>, <image_end>): the mean of the old rows.

The reference is the authors' procedure in torch: resize_token_embeddings, then set every
new input and output row to the mean of the existing rows.
"""
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from convert import llama as llama_convert
from convert.core import state_dict_to_flax
from metamorph_jax import pretrained
from metamorph_jax.models.llama import LlamaConfig
from metamorph_jax.models.token_rows import grow_vocab
from tests.helpers import tiny_llama_hf_config


def torch_reference(tied: bool, count: int = 2):
    """(hf config, our params before, our params after the authors' resize-and-mean)."""
    hf_config = tiny_llama_hf_config(tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    cfg = LlamaConfig.from_hf(hf_config)
    before = state_dict_to_flax(llama_convert.SPEC, cfg, model.state_dict())
    model.resize_token_embeddings(hf_config["vocab_size"] + count)
    with torch.no_grad():
        inputs = model.get_input_embeddings().weight
        outputs = model.get_output_embeddings().weight
        inputs[-count:] = inputs[:-count].mean(dim=0, keepdim=True)
        outputs[-count:] = outputs[:-count].mean(dim=0, keepdim=True)
    grown = cfg.replace(vocab_size=cfg.vocab_size + count)
    after = state_dict_to_flax(llama_convert.SPEC, grown, model.state_dict())
    return hf_config, cfg, before, after


def assert_same_tree(got, want, atol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_grow_vocab_matches_the_authors_resize(tied):
    _, cfg, before, after = torch_reference(tied)
    grown = grow_vocab(before, 2, tied)
    assert ("lm_head" in grown) == (not tied)
    assert_same_tree(grown, after, atol=1e-7)
    old = before["embed_tokens"]["embedding"]
    # Old rows are untouched bit for bit; every other parameter is the same array.
    np.testing.assert_array_equal(grown["embed_tokens"]["embedding"][:cfg.vocab_size], old)
    assert grown["layers"] is before["layers"]
    if not tied:
        np.testing.assert_array_equal(grown["lm_head"]["kernel"][:, :cfg.vocab_size],
                                      before["lm_head"]["kernel"])


def test_grow_vocab_keeps_bf16_and_checks_tying():
    table = np.random.default_rng(0).standard_normal((5, 3)).astype(ml_dtypes.bfloat16)
    grown = grow_vocab({"embed_tokens": {"embedding": table}}, 3, True)
    rows = grown["embed_tokens"]["embedding"]
    assert rows.shape == (8, 3) and rows.dtype == table.dtype
    want = table.astype(np.float32).mean(0).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(rows[5:], np.broadcast_to(want, (3, 3)))
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        grow_vocab({"embed_tokens": {"embedding": table}}, 2, False)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_add_token_rows_to_a_model_folder(tmp_path, tied):
    hf_config, cfg, before, after = torch_reference(tied)
    pretrained.save_pretrained(tmp_path / "llama", "llama", cfg.to_dict(), before, hf_config)
    written = pretrained.add_token_rows(tmp_path / "llama", tmp_path / "grown")
    saved = pretrained.read_model_config(tmp_path / "grown")
    assert saved["model"] == "llama" and saved["config"] == written
    assert saved["config"]["vocab_size"] == saved["hf_config"]["vocab_size"] == cfg.vocab_size + 2
    assert {k: v for k, v in saved["config"].items() if k != "vocab_size"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "vocab_size"}
    assert_same_tree(pretrained.load_params(tmp_path / "grown"), after, atol=1e-7)


def test_add_token_rows_refuses_other_models(tmp_path):
    pretrained.save_pretrained(tmp_path / "m", "siglip", {}, {"x": np.zeros(2)})
    with pytest.raises(ValueError, match="field 'model' is 'siglip'"):
        pretrained.add_token_rows(tmp_path / "m", tmp_path / "out")
