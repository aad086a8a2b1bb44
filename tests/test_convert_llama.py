"""python -m convert for LLaMA: HF -> Flax -> HF bit-exact, errors, and generation parity."""
import json
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from convert.__main__ import main as convert_main
from convert import safetensors_io
from convert.core import ConversionError, open_checkpoint
from metamorph_jax import pretrained
from metamorph_jax.inference.generate import SamplingConfig, TextGenerator
from metamorph_jax.pretrained import load_llama
from tests.helpers import tiny_llama_hf_config, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def save_hf_model(path, dtype=torch.float32, max_shard_size=None, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**tiny_llama_hf_config(**overrides))
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return model


def read_all(folder):
    loaders, _ = open_checkpoint(folder)
    return {name: np.array(load()) for name, load in loaders.items()}


@pytest.mark.parametrize("dtype,shard,tied", [(torch.float32, None, False),
                                             (torch.bfloat16, "20KB", False),
                                             (torch.float32, None, True)],
                         ids=["fp32", "bf16_sharded", "tied"])
def test_round_trip_is_bit_exact(tmp_path, dtype, shard, tied):
    save_hf_model(tmp_path / "hf", dtype, shard, tie_word_embeddings=tied)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "flax")]) == 0
    params = pretrained.load_params(tmp_path / "flax")
    expected_dtype = ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float32
    assert all(np.dtype(x.dtype) == np.dtype(expected_dtype)
               for x in __import__("jax").tree.leaves(params))
    assert convert_main(["to-hf", "llama", str(tmp_path / "flax"), str(tmp_path / "back"),
                         "--max-shard-size", "30KB"]) == 0
    original, back = read_all(tmp_path / "hf"), read_all(tmp_path / "back")
    if tied:
        original.pop("lm_head.weight", None)
        assert "lm_head.weight" not in back
    assert set(original) == set(back)
    for name in original:
        assert original[name].dtype == back[name].dtype, name
        assert original[name].tobytes() == back[name].tobytes(), name
    # transformers loads what we wrote and computes the same logits
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    reference = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)


def test_pickles_are_refused_unless_allowed(tmp_path):
    model = save_hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pytorch_model.bin.*--allow-pickle"):
        open_checkpoint(tmp_path / "hf")
    assert convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "out"),
                         "--allow-pickle"]) == 0
    params = pretrained.load_params(tmp_path / "out")
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"],
                                  model.model.embed_tokens.weight.detach().numpy())


def _edit_checkpoint(folder, edit):
    path = Path(folder) / "model.safetensors"
    tensors = read_all(folder)
    edit(tensors)
    path.unlink()
    safetensors_io.write_file(path, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing: 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)),
     r"unexpected tensor 'model.layers.0.extra.weight'"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((8, 32), np.float32)),
     r"'model.layers.0.self_attn.k_proj.weight' has shape \(8, 32\)"),
    (lambda t: t.__setitem__("model.layers.5.input_layernorm.weight", np.zeros(32, np.float32)),
     r"'model.layers.5.input_layernorm.weight': index 5 is past"),
], ids=["missing", "extra", "wrong_shape", "extra_layer"])
def test_bad_checkpoints_name_the_tensor(tmp_path, edit, message):
    save_hf_model(tmp_path / "hf")
    _edit_checkpoint(tmp_path / "hf", edit)
    with pytest.raises(ConversionError, match=message):
        from convert import get_spec
        from convert.core import hf_to_flax
        hf_to_flax(get_spec("llama"), tmp_path / "hf", tmp_path / "out", progress=False)


def test_bad_config_names_the_field(tmp_path):
    save_hf_model(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["hidden_act"] = "relu"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"config.json: field 'hidden_act'"):
        from convert import get_spec
        from convert.core import hf_to_flax
        hf_to_flax(get_spec("llama"), tmp_path / "hf", tmp_path / "out", progress=False)


def _truncate_data(data: bytes) -> bytes:
    return data[:-100]


def _truncate_header(data: bytes) -> bytes:
    return data[:8 + 20]  # the length prefix promises more header than follows


def _corrupt_header(data: bytes) -> bytes:
    size = int.from_bytes(data[:8], "little")
    return data[:8] + b"{" + b"\xff" * (size - 1) + data[8 + size:]


def _header_not_an_object(data: bytes) -> bytes:
    size = int.from_bytes(data[:8], "little")
    return data[:8] + b"[1, 2]".ljust(size) + data[8 + size:]


def _offsets_missing(data: bytes) -> bytes:
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size].replace(b'"data_offsets"', b'"data_offzets"', 1)
    return data[:8] + header + data[8 + size:]


@pytest.mark.parametrize("damage,message", [
    (_truncate_data, r"tensor '.*' is truncated"),
    (_truncate_header, r"truncated safetensors header \(20 of \d+ bytes\)"),
    (_corrupt_header, r"corrupt safetensors header"),
    (_header_not_an_object, r"corrupt safetensors header: not a JSON object"),
    (_offsets_missing, r"tensor '.*': field 'data_offsets' is None"),
], ids=["truncated_data", "truncated_header", "corrupt_header", "header_list", "no_offsets"])
def test_damaged_safetensors_is_one_error_line(tmp_path, capsys, damage, message):
    save_hf_model(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    capsys.readouterr()
    code = convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert re.search(message, err), err
    with pytest.raises(ConversionError, match=message):
        open_checkpoint(tmp_path / "hf")


def test_wrong_shaped_flax_checkpoint_is_refused(tmp_path):
    save_hf_model(tmp_path / "hf")
    convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "flax")])
    saved = json.loads((tmp_path / "flax" / "model_config.json").read_text())
    saved["config"]["intermediate_size"] = 64
    (tmp_path / "flax" / "model_config.json").write_text(json.dumps(saved))
    with pytest.raises(ConversionError, match=r"parameter 'layers/mlp/down_proj/kernel'"):
        from convert import get_spec
        from convert.core import flax_to_hf
        flax_to_hf(get_spec("llama"), tmp_path / "flax", tmp_path / "back", progress=False)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_generation_matches_transformers(tmp_path, tied):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    eos = tokenizer.eos_token_id
    reference = save_hf_model(tmp_path / "hf", vocab_size=len(tokenizer), eos_token_id=eos,
                              tie_word_embeddings=tied)
    convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "flax")])
    model, params, _ = load_llama(tmp_path / "flax")
    prompts = [tokenizer("the red circle is in the top left")["input_ids"],
               tokenizer("how many")["input_ids"]]
    ours = TextGenerator(model, params, [eos]).generate(prompts, SamplingConfig(max_new_tokens=12))
    assert max(len(tokens) for tokens in ours) > 1  # the comparison covers cached steps
    for prompt, generated in zip(prompts, ours):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                          eos_token_id=eos, pad_token_id=0)
        assert generated == expected[0, len(prompt):].tolist()


def test_generate_cli_prints_the_continuation(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    eos = tokenizer.eos_token_id
    reference = save_hf_model(tmp_path / "hf", vocab_size=len(tokenizer), eos_token_id=eos)
    convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "flax")])
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}],
                                               add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                                      eos_token_id=eos, pad_token_id=0)
    expected_text = tokenizer.decode(expected[0, len(prompt_ids):], skip_special_tokens=True)
    result = subprocess.run(
        [sys.executable, "generate.py", "--llm", str(tmp_path / "flax"), "--tokenizer",
         str(tmp_path / "tok"), "--prompt", "hello world", "--chat", "--max-new-tokens", "6"],
        cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == expected_text.strip()


def test_variant_files_are_chosen_not_mixed(tmp_path):
    """A Hub folder with an fp32 and an fp16 copy converts the copy asked for."""
    model = save_hf_model(tmp_path / "hf")
    tensors = read_all(tmp_path / "hf")
    safetensors_io.write_file(tmp_path / "hf" / "model.fp16.safetensors",
                              [(n, a.shape, np.float16, lambda a=a: a.astype(np.float16))
                               for n, a in tensors.items()])
    assert convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "fp32")]) == 0
    assert convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "fp16"),
                         "--variant", "fp16"]) == 0
    embed = model.model.embed_tokens.weight.detach().numpy()
    fp32 = pretrained.load_params(tmp_path / "fp32")["embed_tokens"]["embedding"]
    fp16 = pretrained.load_params(tmp_path / "fp16")["embed_tokens"]["embedding"]
    assert fp32.dtype == np.float32 and fp16.dtype == np.float16
    np.testing.assert_array_equal(fp32, embed)
    np.testing.assert_array_equal(fp16, embed.astype(np.float16))
    assert convert_main(["to-flax", "llama", str(tmp_path / "hf"), str(tmp_path / "bf16"),
                         "--variant", "bf16"]) == 2
