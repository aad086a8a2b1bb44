"""Stable Diffusion UNet2DConditionModel: diffusers <-> metamorph_jax.models.unet.

The table is mechanical: diffusers' 'down_blocks.0.resnets.1.conv1.weight' is our
'down_blocks_0/resnets_1/conv1/kernel'. Group/layer norm weights become 'scale'.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.linen import meta

from convert.spec import ModelSpec, Rule
from metamorph_jax.models.unet import UNet2DConditionModel, UNetConfig


def param_rules(hf_prefix: str, flax_prefix: str, names: list[tuple[str, str, str]]) -> list[Rule]:
    """Rules for one module: names are (hf suffix, flax suffix, kind) under both prefixes.

    Weights of kind conv/linear map to 'kernel', norm weights ('copy') to 'scale'; each
    module's bias is added as a copy rule."""
    out = []
    for hf, flax, kind in names:
        leaf = "scale" if kind == "copy" else "kernel"
        out.append(Rule(f"{hf_prefix}{hf}.weight", f"{flax_prefix}{flax}/{leaf}", kind))
        out.append(Rule(f"{hf_prefix}{hf}.bias", f"{flax_prefix}{flax}/bias", "copy"))
    return out


def resnet_rules(hf_prefix: str, flax_prefix: str, with_temb: bool = True) -> list[Rule]:
    names = [("norm1", "norm1", "copy"), ("conv1", "conv1", "conv"),
             ("norm2", "norm2", "copy"), ("conv2", "conv2", "conv"),
             ("conv_shortcut", "conv_shortcut", "conv")]
    if with_temb:
        names.append(("time_emb_proj", "time_emb_proj", "linear"))
    return param_rules(hf_prefix, flax_prefix, names)


def transformer_rules(hf_prefix: str, flax_prefix: str, linear_projection: bool) -> list[Rule]:
    """Transformer2DModel: norm, proj_in/out, and blocks {k} of attn1, attn2, ff."""
    proj = "linear" if linear_projection else "conv"
    table = param_rules(hf_prefix, flax_prefix, [("norm", "norm", "copy"),
                                                 ("proj_in", "proj_in", proj),
                                                 ("proj_out", "proj_out", proj)])
    block_hf = f"{hf_prefix}transformer_blocks.{{k}}."
    block_flax = f"{flax_prefix}transformer_blocks_{{k}}/"
    table += param_rules(block_hf, block_flax, [
        ("norm1", "norm1", "copy"), ("norm2", "norm2", "copy"), ("norm3", "norm3", "copy"),
        ("attn1.to_out.0", "attn1/to_out_0", "linear"),
        ("attn2.to_out.0", "attn2/to_out_0", "linear"),
        ("ff.net.0.proj", "ff/net_0/proj", "linear"), ("ff.net.2", "ff/net_2", "linear")])
    for attn in ("attn1", "attn2"):  # q/k/v carry no bias
        for p in ("to_q", "to_k", "to_v"):
            table.append(Rule(f"{block_hf}{attn}.{p}.weight", f"{block_flax}{attn}/{p}/kernel",
                              "linear"))
    return table


def rules(cfg: UNetConfig) -> list[Rule]:
    lin = cfg.use_linear_projection
    table = param_rules("", "", [("conv_in", "conv_in", "conv"), ("conv_out", "conv_out", "conv"),
                                 ("conv_norm_out", "conv_norm_out", "copy"),
                                 ("time_embedding.linear_1", "time_embedding/linear_1", "linear"),
                                 ("time_embedding.linear_2", "time_embedding/linear_2", "linear")])
    for side in ("down", "up"):
        hf, flax = f"{side}_blocks.{{i}}.", f"{side}_blocks_{{i}}/"
        table += resnet_rules(f"{hf}resnets.{{j}}.", f"{flax}resnets_{{j}}/")
        table += transformer_rules(f"{hf}attentions.{{j}}.", f"{flax}attentions_{{j}}/", lin)
        sampler = "downsamplers" if side == "down" else "upsamplers"
        table += param_rules(f"{hf}{sampler}.0.", f"{flax}{sampler}_0/", [("conv", "conv", "conv")])
    table += resnet_rules("mid_block.resnets.{j}.", "mid_block/resnets_{j}/")
    table += transformer_rules("mid_block.attentions.{j}.", "mid_block/attentions_{j}/", lin)
    return table


def param_shapes(cfg: UNetConfig):
    model = UNet2DConditionModel(cfg)
    size = 2 ** (len(cfg.block_out_channels) - 1)
    variables = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, cfg.in_channels)),
        jnp.zeros((1,)), jnp.zeros((1, 1, cfg.cross_attention_dim)))
    return meta.unbox(variables["params"])


SPEC = ModelSpec(name="unet", config_from_hf=UNetConfig.from_hf, config_to_hf=UNetConfig.to_hf,
                 config_from_dict=lambda d: UNetConfig(**d), rules=rules,
                 param_shapes=param_shapes, weights_name="diffusion_pytorch_model")
