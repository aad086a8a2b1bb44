"""The main job (`python train.py` with no arguments): the MetaMorph recipe on the Shapes
world with small random models, then the held-out evaluation.

    python train.py [--workdir runs/shapes] [--config.stages.instruct.steps=400 ...]

What it needs is made under `assets.root` when absent (tiny.ensure_assets): the Shapes
world at 32 pixels, a word-level tokenizer with the image tokens, a small random LLaMA and
a small random SigLIP tower, frozen in every stage as in the method (`TOWER`): SigLIP's
architecture and token path (last block before the post-layernorm -> bilinear grid
reduction -> L2 norm) with 4-pixel patches (an 8x8 grid) reduced to 4x4 = 16 visual tokens,
and the patch embedding's bias set so that white patches embed to zero
(tiny.zero_background_patches). With the default zero bias the white background dominates
every token and the tokens of different images are nearly parallel (per-token cosine
0.96), so the LLM and the decoder have almost nothing to read; with it 0.68, and a linear
probe reads 97% of the grid cells' contents from the tokens (docs/design.md). Stages: the adapter (VPiT stage 1, image QA
and text-to-image), instruct (VPiT stage 2, all six kinds) and the pixel-space decoder
conditioned on the tower's tokens. Then train.py runs evaluation/shapes_eval.py on the
world's test split and writes WORK_DIR/final_metrics.json and WORK_DIR/samples.png.

The schema is configs/tiny.py's; sizes and steps were chosen by measuring the run on 2 CPU
cores (README: the numbers and the time).
"""
import importlib.util
from pathlib import Path

import ml_collections


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).with_name("tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ASSETS = "runs/shapes_assets"
IMAGE_SIZE = 32
# The tower: 4-pixel patches (an 8x8 grid) reduced bilinearly to 4x4 = 16 visual tokens, and
# white patches embedded to zero (tiny.zero_background_patches).
TOWER = dict(patch_size=4, num_visual_tokens=16, zero_background=True)
TOKENS = TOWER["num_visual_tokens"]
SEQ_LEN = 256   # an image is 18 positions; a video record holds several
# Mostly image QA and text-to-image: the two kinds the evaluation scores.
KIND_WEIGHTS = (("image_qa", 6.0), ("text_to_image", 4.0), ("video_qa", 0.5),
                ("image_to_image", 0.5), ("video", 0.5), ("visual_thinking", 0.5))


def get_config(assets_root: str | None = None) -> ml_collections.ConfigDict:
    root = assets_root or ASSETS
    config = _tiny().get_config(root)
    config.work_dir = "runs/shapes"
    config.checkpoint_every = 200
    config.log_every = 20
    config.eval_every = 0
    config.assets.update(dict(image_size=IMAGE_SIZE, train=2000, validation=100, test=300,
                              clips=40, tower=TOWER))
    for name, steps, lr in (("adapter", 100, 1e-2), ("instruct", 600, 3e-3)):
        stage = config.stages[name]
        stage.steps = steps
        stage.optim.lr = lr
        for data in (stage.data, stage.eval_data):
            data.image_size = IMAGE_SIZE
            data.batch_size = 16
            data.num_image_tokens = TOKENS
            data.seq_len = SEQ_LEN
    for kind, weight in KIND_WEIGHTS:   # sampling shares (its eval data is read once)
        config.stages.instruct.data.sources[kind].weight = weight
    decoder = config.stages.decoder
    decoder.steps = 800
    for data in (decoder.data, decoder.eval_data):
        data.image_size = IMAGE_SIZE
        data.batch_size = 16
        data.num_image_tokens = TOKENS
    decoder.model.num_tokens = TOKENS
    decoder.model.context_length = TOKENS
    decoder.model.image_size = IMAGE_SIZE
    decoder.model.unet.sample_size = IMAGE_SIZE
    # Two levels (32x32, 16x16); cross-attention only in the mid block (16x16). With the
    # token grid as input, cross-attention in the levels doubled the step time and gave a
    # worse decoder (true-token oracle 8/38 against 15/38 without it, 800 steps).
    decoder.model.unet.block_out_channels = (16, 32)
    decoder.model.unet.down_block_types = ("DownBlock2D", "DownBlock2D")
    decoder.model.unet.up_block_types = ("UpBlock2D", "UpBlock2D")
    decoder.model.unet.norm_num_groups = 8
    # From configs/tiny.py: the token grid as extra input channels (cross-attention alone does
    # not tell a small UNet where things are), and v on a zero-terminal-SNR schedule (SD's
    # latent schedule leaves sqrt(abar) = 0.068 at t = 999, where an epsilon model's x0
    # estimate painted colour casts); docs/design.md has the measurements.
    decoder.model.unet.in_channels = 3 + decoder.model.unet.cross_attention_dim
    config.final_eval = ml_collections.ConfigDict(dict(
        world=f"{root}/shapes", split="test", max_questions=0, max_prompts=0, batch_size=32,
        max_answer_tokens=8, sampler="ddim", diffusion_steps=25, guidance_scale=3.0,
        samples=8))
    return config
