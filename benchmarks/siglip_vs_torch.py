"""Encoder throughput: our jitted SigLIP tower vs transformers' SiglipVisionModel, same run.

Both fp32 on this machine's CPU, the same random weights (moved with the converter's
table), batch 8 at 224 px of a ~100M-parameter SigLIP-B/16-shaped config by default.
Prints images/s of each, the ratio, and the max |diff| of the pooled outputs.

    python -m benchmarks.siglip_vs_torch [--batch 8] [--image-size 224] [--iters 4]
"""
from __future__ import annotations

import argparse
import os
import time


import jax
import jax.numpy as jnp
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import SiglipVisionConfig, SiglipVisionModel

from convert.siglip import SPEC
from metamorph_jax.models import siglip
from convert.core import state_dict_to_flax


def images_per_second(run, batch: int, warmup: int, iters: int, label: str) -> float:
    for _ in range(warmup):
        run()
    timings = []
    for _ in tqdm(range(iters), desc=label, unit="batch"):
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
    # The median ignores one-off stalls from other processes on a shared machine.
    return batch / float(np.median(timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=4)
    args = parser.parse_args()

    hf_config = SiglipVisionConfig(hidden_size=args.hidden_size, intermediate_size=args.mlp,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   image_size=args.image_size, patch_size=args.patch_size)
    torch.manual_seed(0)
    reference = SiglipVisionModel(hf_config).eval()
    n_params = sum(p.numel() for p in reference.parameters())
    config = siglip.SiglipConfig.from_hf(hf_config.to_dict())
    params = jax.tree.map(jnp.asarray, state_dict_to_flax(SPEC, config, reference.state_dict()))

    pixels = np.random.default_rng(0).standard_normal(
        (args.batch, 3, args.image_size, args.image_size)).astype(np.float32)
    torch_pixels = torch.from_numpy(pixels)
    jax_pixels = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    model = siglip.SiglipVisionModel(config)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))

    print(f"SigLIP {n_params / 1e6:.1f}M params, batch {args.batch} at {args.image_size}px, fp32, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}, sdpa attention in transformers ({reference.config._attn_implementation})")
    start = time.perf_counter()
    ours_out = jax.block_until_ready(forward(params, jax_pixels))
    print(f"jax compile + first run: {time.perf_counter() - start:.1f}s")
    with torch.no_grad():
        torch_out = reference(torch_pixels)
    diff = np.abs(np.asarray(ours_out["pooler_output"]) - torch_out.pooler_output.numpy()).max()
    print(f"max |diff| pooled output: {diff:.2e}")

    def run_torch():
        with torch.no_grad():
            reference(torch_pixels)

    def run_jax():
        jax.block_until_ready(forward(params, jax_pixels))

    torch_rate = images_per_second(run_torch, args.batch, args.warmup, args.iters, "transformers")
    jax_rate = images_per_second(run_jax, args.batch, args.warmup, args.iters, "metamorph-jax")
    print(f"transformers SiglipVisionModel: {torch_rate:8.2f} images/s")
    print(f"metamorph-jax (jit):            {jax_rate:8.2f} images/s")
    print(f"ratio jax / torch:              {jax_rate / torch_rate:8.2f}x")


if __name__ == "__main__":
    main()
