"""Stable Diffusion AutoencoderKL: diffusers <-> metamorph_jax.models.vae."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.linen import meta

from convert.spec import ModelSpec, Rule
from convert.unet import param_rules, resnet_rules
from metamorph_jax.models.vae import AutoencoderKL, VAEConfig


def _mid_block_rules(hf: str, flax: str) -> list[Rule]:
    table = resnet_rules(f"{hf}mid_block.resnets.{{j}}.", f"{flax}mid_block/resnets_{{j}}/",
                         with_temb=False)
    table += param_rules(f"{hf}mid_block.attentions.{{j}}.", f"{flax}mid_block/attentions_{{j}}/",
                         [("group_norm", "group_norm", "copy"), ("to_q", "to_q", "linear"),
                          ("to_k", "to_k", "linear"), ("to_v", "to_v", "linear"),
                          ("to_out.0", "to_out_0", "linear")])
    return table


def rules(cfg: VAEConfig) -> list[Rule]:
    table = param_rules("", "", [("quant_conv", "quant_conv", "conv"),
                                 ("post_quant_conv", "post_quant_conv", "conv")])
    for part, side, sampler in (("encoder", "down", "downsamplers"),
                                ("decoder", "up", "upsamplers")):
        hf, flax = f"{part}.", f"{part}/"
        table += param_rules(hf, flax, [("conv_in", "conv_in", "conv"),
                                        ("conv_out", "conv_out", "conv"),
                                        ("conv_norm_out", "conv_norm_out", "copy")])
        table += resnet_rules(f"{hf}{side}_blocks.{{i}}.resnets.{{j}}.",
                              f"{flax}{side}_blocks_{{i}}/resnets_{{j}}/", with_temb=False)
        table += param_rules(f"{hf}{side}_blocks.{{i}}.{sampler}.0.",
                             f"{flax}{side}_blocks_{{i}}/{sampler}_0/", [("conv", "conv", "conv")])
        table += _mid_block_rules(hf, flax)
    return table


def param_shapes(cfg: VAEConfig):
    model = AutoencoderKL(cfg)
    size = 2 ** (len(cfg.block_out_channels) - 1)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                               jnp.zeros((1, size, size, cfg.in_channels)))
    return meta.unbox(variables["params"])


SPEC = ModelSpec(name="vae", config_from_hf=VAEConfig.from_hf, config_to_hf=VAEConfig.to_hf,
                 config_from_dict=lambda d: VAEConfig(**d), rules=rules,
                 param_shapes=param_shapes, weights_name="diffusion_pytorch_model")
