"""UNet denoising steps per second: our Flax UNet (jit, CPU) vs diffusers' PyTorch UNet,
same weights, same inputs, measured in one run. Prints both rates and the ratio.

    python -m benchmarks.unet_vs_diffusers [--steps 20] [--batch 2] [--size 32]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from tqdm.auto import tqdm


from convert import unet as unet_convert
from convert.core import state_dict_to_flax
from metamorph_jax.models.unet import UNet2DConditionModel, UNetConfig

SMALL = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
    layers_per_block=1, norm_num_groups=32, attention_head_dim=4, cross_attention_dim=128,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def interleaved_rates(fns: dict, steps: int, block: int = 5) -> dict:
    """Steps/s of each fn from the median of per-call times. The fns take turns in blocks
    of `block` calls, so that load from other processes hits both sides alike (blocks
    rather than single calls: XLA's and PyTorch's thread pools slow each other down when
    they hand over every call)."""
    for fn in fns.values():
        fn()  # warm-up (compiles the JAX side)
    times = {name: [] for name in fns}
    with tqdm(total=steps * len(fns), desc="denoising steps") as bar:
        while min(len(t) for t in times.values()) < steps:
            for name, fn in fns.items():
                for _ in range(block):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
                    bar.update()
    return {name: 1.0 / float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--context", type=int, default=77)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch_model = TorchUNet(**SMALL).eval()
    cfg = UNetConfig.from_hf(dict(torch_model.config))
    params = jax.device_put(state_dict_to_flax(unet_convert.SPEC, cfg, torch_model.state_dict()))
    model = UNet2DConditionModel(cfg)
    apply = jax.jit(model.apply)

    rs = np.random.RandomState(0)
    x = rs.randn(args.batch, 4, args.size, args.size).astype(np.float32)
    ctx = rs.randn(args.batch, args.context, SMALL["cross_attention_dim"]).astype(np.float32)
    t = np.full((args.batch,), 500)
    x_t, ctx_t, t_t = torch.tensor(x), torch.tensor(ctx), torch.tensor(t)
    x_j, ctx_j, t_j = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ctx), jnp.asarray(t)

    def run_torch():
        with torch.no_grad():
            return torch_model(x_t, t_t, ctx_t).sample

    def run_jax():
        return apply({"params": params}, x_j, t_j, ctx_j).block_until_ready()

    diff = np.abs(np.asarray(run_jax()).transpose(0, 3, 1, 2) - run_torch().numpy()).max()
    rates = interleaved_rates({"torch": run_torch, "jax": run_jax}, args.steps)
    torch_rate, jax_rate = rates["torch"], rates["jax"]
    print(f"config: {SMALL['block_out_channels']} channels, batch {args.batch}, "
          f"{args.size}x{args.size} latents, context {args.context}; torch threads "
          f"{torch.get_num_threads()}, jax devices {jax.devices()}")
    print(f"max |diff| between the two outputs: {diff:.2e}")
    print(f"median over {args.steps}+ calls each, alternating blocks of 5")
    print(f"diffusers (PyTorch eager, no_grad): {torch_rate:.2f} steps/s")
    print(f"metamorph-jax (Flax, jit):          {jax_rate:.2f} steps/s")
    print(f"ratio flax / diffusers: {jax_rate / torch_rate:.2f}x")


if __name__ == "__main__":
    main()
