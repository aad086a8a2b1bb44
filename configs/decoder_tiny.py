"""A tiny pixel-space visualiser for tests (CPU-sized): decoder_sd15's stage schema with an
8-pixel, two-level UNet and no VAE. The SigLIP folder (16-wide tokens, 4 per image) is
given on the command line: --config.stages.decoder.init.vision_dir=DIR."""
import importlib.util
from pathlib import Path

import ml_collections


def _sd15():
    spec = importlib.util.spec_from_file_location(
        "decoder_sd15", Path(__file__).with_name("decoder_sd15.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    config = _sd15().get_config()
    config.work_dir = "runs/decoder_tiny"
    config.checkpoint_every = 100
    config.log_every = 1
    stage = config.stages.decoder
    stage.steps = 300
    stage.data.image_size = 8
    stage.data.batch_size = 16
    stage.data.worker_count = 0
    stage.optim.update(dict(lr=3e-3, warmup=20, decay_end_step=300, grad_clip=1.0))
    stage.dtype = "float32"
    stage.remat_policy = "none"
    stage.model = ml_collections.ConfigDict(dict(
        token_dim=16, projector_hidden=32, num_tokens=4, context_length=6, image_size=8,
        unet=dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                  layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=None))
    stage.cfg_prob = 0.1
    stage.sample = ml_collections.ConfigDict(dict(sampler="ddim", num_steps=20, guidance_scale=2.0))
    return config
