"""The main job (`python train.py` with no arguments): the MetaMorph recipe on the Shapes
world from pretrained models, as the paper starts VPiT from LLaMA-3 and SigLIP, then the
held-out evaluation.

    python train.py [--workdir runs/shapes] [--config.stages.instruct.steps=400 ...]
    python train.py --config configs/shapes.py:random    # the same, from random models

What it needs is made under `assets.root` when absent (tiny.ensure_assets): the Shapes world
at 36 pixels with SCENES training scenes, the world's text corpus, a word-level tokenizer,
and a small random LLaMA and SigLIP tower. Stages:
- `text` (stage 0): the LLM trained on the world's text (data/shapes_text.py: captions,
  questions with their answers, edits, motions and world-knowledge facts, some held out of
  every VPiT record for finding 4);
- `tower`: SigLIP's sigmoid image-text pretraining of the tower on the world's captions
  (configs/tower_tiny.py's `tower_stage`); every later stage reads it frozen;
- `adapter` (VPiT stage 1, image QA and text-to-image, from the text stage's LLM),
  `instruct` (VPiT stage 2, all six kinds) and the pixel-space `decoder`, conditioned on
  the tower's tokens.
Then train.py runs evaluation/shapes_eval.py on the world's test split and writes
WORK_DIR/final_metrics.json and WORK_DIR/samples.png.

The tower: SigLIP's architecture and token path (last block before the post-layernorm ->
bilinear grid reduction -> L2 norm) with 6-pixel patches (a 6x6 grid) reduced to 3x3 = 9
visual tokens, one per cell of the world's 3x3 grid (the bilinear reduction averages each
cell's 2x2 patches exactly), and white patches embedded to zero at initialisation
(tiny.zero_background_patches). Measured (README): with 16 tokens straddling the cells,
or with the tower pretrained for 300 steps instead of 1000, the VPiT stages did not learn
to read colour or shape; the 1000-step tower makes them the tokens' main directions.

`:random` keeps the geometry and the VPiT stages but skips the text and tower stages: the
LLM and the tower stay random (finding 3's weakest LLM; the main job before issue 23).

The schema is configs/tiny.py's; sizes and steps were chosen by measuring the run on 2 CPU
cores (README: the numbers and the time).
"""
import importlib.util
from pathlib import Path

import ml_collections
from ml_collections import config_dict

ASSETS = "runs/shapes_assets_v2"   # v2: 36 px, 9 tokens, 20000 scenes, the text corpus
IMAGE_SIZE = 36
TOWER = dict(patch_size=6, num_visual_tokens=9, zero_background=True)
TOKENS = TOWER["num_visual_tokens"]
SCENES = 20000   # training scenes: with 2000, image QA memorised them (README)
SEQ_LEN = 256    # an image is 11 positions; a video record holds several
# Mostly image QA and text-to-image: the two kinds the evaluation scores.
KIND_WEIGHTS = (("image_qa", 6.0), ("text_to_image", 4.0), ("video_qa", 0.5),
                ("image_to_image", 0.5), ("video", 0.5), ("visual_thinking", 0.5))
# The text stage (README, "The text stage").
TEXT_CORPUS_SCENES = 4000
TEXT_STEPS, TEXT_LR = 400, 1e-2
# The tower stage (README: probe before and after).
TOWER_STEPS, TOWER_LR, TOWER_BATCH = 1000, 3e-3, 128


def _config_module(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_stage(root: str) -> ml_collections.ConfigDict:
    """The LLM (the assets' random LLaMA) on the world's text corpus (data/shapes_text.py)."""
    stage = ml_collections.ConfigDict()
    stage.kind = "text"
    stage.steps = TEXT_STEPS
    stage.init = ml_collections.ConfigDict(dict(
        llm_dir=f"{root}/llm", tokenizer_dir=f"{root}/text_tokenizer", from_previous=False))
    stage.data = ml_collections.ConfigDict(dict(
        sources=dict(corpus=dict(path=f"{root}/text/corpus.jsonl", weight=1.0)),
        seq_len=SEQ_LEN, batch_size=16, template="llama3", seed=0,
        num_epochs=config_dict.placeholder(int), worker_count=0, strict=False))
    stage.eval_data = ml_collections.ConfigDict(dict(sources={}))
    stage.optim = _config_module("tiny").optim(TEXT_LR)
    stage.grad_accum_steps = 1
    stage.dtype = "float32"
    stage.remat_policy = "none"
    return stage


def _vpit_and_decoder(config: ml_collections.ConfigDict) -> None:
    """The VPiT stages' and the decoder's sizes, steps and data on this world."""
    for name, steps, lr in (("adapter", 100, 1e-2), ("instruct", 1000, 3e-3)):
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
    # 1600 steps: the decoder alone on the true tokens of the 38 single-shape test prompts
    # read 0.39 of them right (all four attributes) after 800 steps, 0.92 after 1600 (README).
    decoder.steps = 1600
    for data in (decoder.data, decoder.eval_data):
        data.image_size = IMAGE_SIZE
        data.batch_size = 16
        data.num_image_tokens = TOKENS
    decoder.model.num_tokens = TOKENS
    decoder.model.context_length = TOKENS
    decoder.model.image_size = IMAGE_SIZE
    decoder.model.unet.sample_size = IMAGE_SIZE
    # Two levels (36x36, 18x18); cross-attention only in the mid block. With the token grid
    # as input, cross-attention in the levels doubled the step time and gave a worse decoder
    # (true-token oracle 8/38 against 15/38 without it, 800 steps, at 32 px and 16 tokens).
    decoder.model.unet.block_out_channels = (16, 32)
    decoder.model.unet.down_block_types = ("DownBlock2D", "DownBlock2D")
    decoder.model.unet.up_block_types = ("UpBlock2D", "UpBlock2D")
    decoder.model.unet.norm_num_groups = 8
    # From configs/tiny.py: the token grid as extra input channels (cross-attention alone does
    # not tell a small UNet where things are), and v on a zero-terminal-SNR schedule (SD's
    # latent schedule leaves sqrt(abar) = 0.068 at t = 999, where an epsilon model's x0
    # estimate painted colour casts); docs/design.md has the measurements.
    decoder.model.unet.in_channels = 3 + decoder.model.unet.cross_attention_dim


def recipe(assets_root: str = ASSETS, pretrained: bool = True) -> ml_collections.ConfigDict:
    """The main job on the assets under `assets_root`; `pretrained` False: no text or tower
    stage, the VPiT stages start from the assets' random LLM and tower."""
    config = _config_module("tiny").get_config(assets_root)
    root = config.assets.root
    config.work_dir = "runs/shapes" if pretrained else "runs/shapes_random"
    config.checkpoint_every = 200
    config.log_every = 20
    config.eval_every = 0
    config.assets.update(dict(image_size=IMAGE_SIZE, train=SCENES, validation=100, test=300,
                              clips=40, tower=TOWER, text_corpus=TEXT_CORPUS_SCENES))
    _vpit_and_decoder(config)
    order = ["adapter", "instruct", "decoder"]
    if pretrained:
        config.stages.text = text_stage(root)
        config.stages.tower = _config_module("tower_tiny").tower_stage(
            root, steps=TOWER_STEPS, lr=TOWER_LR, image_size=IMAGE_SIZE, batch_size=TOWER_BATCH)
        config.stages.adapter.init.llm_dir = "@text"
        for name in ("adapter", "decoder"):
            config.stages[name].init.vision_dir = "@tower"
        order = ["text", "tower"] + order
    config.order = tuple(order)
    config.final_eval = ml_collections.ConfigDict(dict(
        world=f"{root}/shapes", split="test", max_questions=0, max_prompts=0, batch_size=32,
        max_answer_tokens=8, sampler="ddim", diffusion_steps=25, guidance_scale=3.0,
        samples=8, max_edits=64, max_video=64, max_frechet_prompts=128))
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: None (from pretrained models) or "random" (from the assets' random ones)."""
    if arg not in (None, "", "random"):
        raise ValueError(f"configs/shapes.py: unknown argument {arg!r}; use configs/shapes.py "
                         "or configs/shapes.py:random")
    return recipe(pretrained=arg != "random")
