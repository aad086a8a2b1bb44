"""A tiny pixel-space visualiser for tests and the built-in Shapes world (CPU-sized)."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = "decoder"
    config.model = ml_collections.ConfigDict(dict(
        token_dim=16, projector_hidden=32, num_tokens=4, context_length=6, image_size=8,
        unet=dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                  layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=None))
    config.dtype = "float32"
    config.remat = False
    config.schedule = ml_collections.ConfigDict(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon", set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="leading"))
    config.train = ml_collections.ConfigDict(dict(
        batch_size=16, lr_schedule="log_warmup_linear_decay", peak_lr=3e-3, warmup_steps=20,
        decay_end_step=300, num_steps=300, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
        grad_clip_norm=1.0, cfg_prob=0.1))
    config.sample = ml_collections.ConfigDict(dict(
        sampler="ddim", num_steps=20, guidance_scale=2.0))
    return config
