"""A laptop-sized end-to-end run: a tiny random LLaMA saved as a Flax model folder,
converted to a Hugging Face folder and back, then decoded with the KV cache.

  python demo.py [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from convert import get_spec
from convert.core import flax_to_hf, hf_to_flax
from metamorph_jax import pretrained, tiny
from metamorph_jax.data import conversation as conv
from metamorph_jax.inference.generate import SamplingConfig, TextGenerator
from metamorph_jax.models.llama import LlamaForCausalLM


def run(work_dir: Path) -> list[str]:
    tokenizer = tiny.tiny_tokenizer(work_dir / "tokenizer")
    config = tiny.tiny_llama_config(tokenizer)
    dummy = np.zeros((1, 1), np.int32)
    variables = LlamaForCausalLM(config).init(jax.random.key(0), dummy, positions=dummy)
    params = jax.tree.map(np.asarray, nn.unbox(variables)["params"])
    pretrained.save_pretrained(work_dir / "random_flax", "llama", config.to_dict(), params)
    spec = get_spec("llama")
    flax_to_hf(spec, work_dir / "random_flax", work_dir / "hf", tokenizer_dir=work_dir / "tokenizer")
    hf_to_flax(spec, work_dir / "hf", work_dir / "flax")
    model, params, _ = pretrained.load_llama(work_dir / "flax")
    hf_tokenizer = pretrained.load_tokenizer(work_dir / "hf")
    template = pretrained.chat_template(work_dir / "flax")
    prompts = [conv.prompt_tokens([conv.Turn("user", text)], hf_tokenizer, template)
               for text in ("what colour is the circle", "how many shapes")]
    generator = TextGenerator(model, params, model.config.eos_token_ids)
    outputs = generator.generate(prompts, SamplingConfig(max_new_tokens=16))
    return [hf_tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", help="where to write the model folders (default: a temp dir)")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="metamorph_demo_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    for line in run(work_dir):
        print(repr(line))
    print(f"model folders in {work_dir}")
    return 0
