"""Every stage on the Shapes world with tiny random models: VPiT adapter (stage 1), VPiT
instruct (stage 2) and the decoder. Runs in well under two minutes on 2 CPU cores;
the tests use it.

    python train.py --config configs/tiny.py[:ASSETS_DIR] [--workdir DIR] [--config.stages.adapter.steps=5]

What it needs is made under `assets.root` when absent (tiny.ensure_assets): the Shapes
world at 32 pixels, a word-level tokenizer with the image tokens, a tiny LLaMA and a tiny
SigLIP tower. Every field can be overridden on the command line
(`--config.stages.instruct.optim.lr=1e-3`, `--config.log_every=5`).

The schema (one for every stage; runner.RUN_FIELDS and runner.STAGE_FIELDS):

    work_dir, seed, mesh{data, fsdp, tensor}, order, checkpoint_every, keep,
    async_checkpoints, log_every, eval_every, eval_batches, skip_nonfinite, data_shards,
    assets
    stages.<name>: kind, steps, allow_short, init{...}, data{sources{name: {path, weight,
        image_root}}, DataConfig fields}, eval_data{same}, optim{lr, schedule, warmup,
        end_ratio, decay_end_step, weight_decay, b1, b2, eps, grad_clip}, grad_accum_steps,
        dtype, remat_policy, scan_layers, vision_coef, model, noise, cfg_prob

Data: `num_epochs` None repeats the sources forever, each drawn by its `weight` (a sampling
share); `num_epochs` k reads every record of every source exactly k times, the sources
concatenated and shuffled together each epoch, and their weights must then be equal.
`steps` 0 trains one pass over such finite data, counted before the stage (`train.py
--dry-run` prints the records and steps per stage); finite data that ends before `steps`
is an error, or with `allow_short` True a stage marked incomplete.
"""
import ml_collections
from ml_collections import config_dict

ASSETS = "runs/tiny_assets"
IMAGE_SIZE = 16
KIND_WEIGHTS = (("image_qa", 6.0), ("video_qa", 1.0), ("text_to_image", 2.0),
                ("image_to_image", 1.0), ("video", 1.0), ("visual_thinking", 1.0))
NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
             beta_schedule="scaled_linear", prediction_type="epsilon", set_alpha_to_one=False,
             steps_offset=1, timestep_spacing="leading", rescale_betas_zero_snr=False)


def shapes_data(root: str, split: str, kinds, batch_size: int = 8,
                num_epochs=None) -> ml_collections.ConfigDict:
    """Data fields for the Shapes world's `split`, one source per kind. The weights are
    sampling shares of data repeated forever; finite data (num_epochs k) reads every record
    k times, so its sources all keep weight 1."""
    data = ml_collections.ConfigDict()
    data.sources = ml_collections.ConfigDict({
        kind: dict(path=f"{root}/shapes/{split}/{kind}.jsonl",
                   weight=weight if num_epochs is None else 1.0,
                   image_root=f"{root}/shapes") for kind, weight in kinds})
    data.seq_len = 128
    data.batch_size = batch_size         # rows per process; must divide over data x fsdp
    data.num_image_tokens = 4
    data.image_size = IMAGE_SIZE
    data.image_dtype = "float32"
    data.max_images_per_row = 8
    data.template = "llama3"
    data.seed = 0
    data.num_epochs = config_dict.placeholder(int) if num_epochs is None else num_epochs
    data.worker_count = 0
    data.strict = False
    data.visual_tokens = config_dict.placeholder(str)   # a token store instead of pixels
    return data


def optim(lr: float, schedule: str = "warmup_cosine", warmup: float = 0.1,
          weight_decay: float = 0.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=lr, schedule=schedule, warmup=warmup, end_ratio=0.1, decay_end_step=0,
        weight_decay=weight_decay, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0))


def vpit_stage(kind: str, steps: int, lr: float, kinds, root: str, **init):
    stage = ml_collections.ConfigDict()
    stage.kind = kind
    stage.steps = steps
    stage.allow_short = False   # finite data ending before `steps` is an error
    stage.init = ml_collections.ConfigDict(dict(
        dict(llm_dir="", vision_dir="", tokenizer_dir="", model_dir="", from_previous=False,
             seed=0), **init))
    stage.data = shapes_data(root, "train", kinds)
    stage.eval_data = shapes_data(root, "validation", kinds, num_epochs=1)
    stage.optim = optim(lr)
    stage.grad_accum_steps = 1
    stage.dtype = "float32"
    stage.remat_policy = "none"
    stage.vision_coef = config_dict.placeholder(float)
    return stage


def decoder_stage(root: str, steps: int) -> ml_collections.ConfigDict:
    stage = ml_collections.ConfigDict()
    stage.kind = "decoder"
    stage.steps = steps
    stage.allow_short = False   # finite data ending before `steps` is an error
    stage.init = ml_collections.ConfigDict(dict(
        vision_dir=f"{root}/siglip", model_dir="", unet_dir="", vae_dir="",
        from_previous=False, seed=0))
    stage.data = shapes_data(root, "train", (("image_qa", 1.0),))
    stage.eval_data = shapes_data(root, "validation", (("image_qa", 1.0),), num_epochs=1)
    stage.optim = optim(3e-3, schedule="log_warmup_linear_decay", warmup=3, weight_decay=0.01)
    stage.grad_accum_steps = 1
    stage.dtype = "float32"
    stage.remat_policy = "none"
    stage.model = ml_collections.ConfigDict(dict(
        token_dim=32, projector_hidden=32, num_tokens=4, context_length=6,
        image_size=IMAGE_SIZE,
        # One cross-attention level: a second one doubles the compile time.
        unet=dict(sample_size=IMAGE_SIZE, in_channels=3, out_channels=3,
                  block_out_channels=(16,), layers_per_block=1, attention_head_dim=4,
                  cross_attention_dim=32, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",)),
        vae=None))
    # The Shapes decoder's choices (configs/shapes.py, models/visualizer.py): the token grid as
    # input channels, v on a zero-terminal-SNR schedule sampled from t = 999.
    stage.model.token_grid = True
    stage.model.unet.in_channels = 3 + stage.model.unet.cross_attention_dim
    stage.noise = ml_collections.ConfigDict(dict(
        NOISE, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing"))
    stage.cfg_prob = 0.1
    return stage


def get_config(assets_root: str | None = None) -> ml_collections.ConfigDict:
    """assets_root (`--config configs/tiny.py:DIR`): where the inputs live or are made."""
    root = assets_root or ASSETS
    config = ml_collections.ConfigDict()
    config.work_dir = "runs/tiny"
    config.seed = 0
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # every device
    config.order = ("adapter", "instruct", "decoder")
    config.checkpoint_every = 4
    config.keep = 2
    config.async_checkpoints = True
    config.log_every = 1
    config.eval_every = 8
    config.eval_batches = 1
    config.skip_nonfinite = False
    config.data_shards = 0   # one per process; fixed, the batches do not depend on the processes
    config.assets = ml_collections.ConfigDict(dict(
        kind="tiny_shapes", root=root, image_size=IMAGE_SIZE, train=48, validation=16, test=0,
        clips=8, seed=0))
    config.stages = ml_collections.ConfigDict()
    config.stages.adapter = vpit_stage(
        "adapter", 8, 1e-2, (("image_qa", 1.0), ("text_to_image", 1.0)), root,
        llm_dir=f"{root}/llm", vision_dir=f"{root}/siglip", tokenizer_dir=f"{root}/tokenizer")
    config.stages.instruct = vpit_stage("instruct", 8, 3e-3, KIND_WEIGHTS, root,
                                        from_previous=True)
    config.stages.decoder = decoder_stage(root, 8)
    # The held-out evaluation train.py runs after the stages (evaluation/shapes_eval.py),
    # here on a few validation records (the tiny world has no test scenes).
    config.final_eval = ml_collections.ConfigDict(dict(
        world=f"{root}/shapes", split="validation", max_questions=8, max_prompts=8,
        batch_size=8, max_answer_tokens=4, sampler="ddim", diffusion_steps=2,
        guidance_scale=3.0, samples=4, max_edits=4, max_video=4))
    return config
