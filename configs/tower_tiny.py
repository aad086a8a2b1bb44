"""The `tower` stage alone on the tiny Shapes world: SigLIP's sigmoid image-text
pretraining of configs/tiny.py's random tower against a small text tower, on the world's
text_to_image records (their "caption" field and image). Seconds on 2 CPU cores; the tests
use it.

    python train.py --config configs/tower_tiny.py[:ASSETS_DIR] [--workdir DIR]

The export, WORK_DIR/tower/final/, is a `siglip` folder (with the attention-pool head the
loss trained) that a VPiT or decoder stage takes as `init.vision_dir`, frozen there; the
text tower, its tokenizer and the learned logit scale and bias are in final/text_tower/.
To pretrain the tower before the VPiT stages of another config, add a stage built by
`tower_stage(root, ...)` first in its `order` and point the VPiT stages' and the decoder's
`init.vision_dir` at `WORK_DIR/tower/final` (configs/shapes.py does not, yet).

Stage fields (runner.STAGE_FIELDS; `model`: objectives.TOWER_MODEL_FIELDS):
    kind "tower", steps, init{vision_dir, tokenizer_dir, seed}, data / eval_data
    (data.sources: text_to_image.jsonl files; data.seq_len: the caption length in tokens,
    padded), optim, grad_accum_steps, dtype, remat_policy,
    model{vision (only without init.vision_dir), text, logit_scale_init, logit_bias_init}
"""
import importlib.util
from pathlib import Path

import ml_collections


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).with_name("tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The longest Shapes caption (three shapes) is 26 word tokens; + end-of-text.
CAPTION_TOKENS = 32


def tower_stage(root: str, steps: int, lr: float, image_size: int, batch_size: int,
                text: dict | None = None) -> ml_collections.ConfigDict:
    """A tower stage on the Shapes world under `root`, starting from `root`/siglip."""
    tiny = _tiny()
    stage = ml_collections.ConfigDict()
    stage.kind = "tower"
    stage.steps = steps
    stage.init = ml_collections.ConfigDict(dict(vision_dir=f"{root}/siglip",
                                                tokenizer_dir=f"{root}/tokenizer", seed=0))
    pairs = (("text_to_image", 1.0),)
    stage.data = tiny.shapes_data(root, "train", pairs, batch_size=batch_size)
    stage.eval_data = tiny.shapes_data(root, "validation", pairs, batch_size=batch_size,
                                       num_epochs=1)
    for data in (stage.data, stage.eval_data):
        data.seq_len = CAPTION_TOKENS
        data.image_size = image_size
    stage.optim = tiny.optim(lr, weight_decay=1e-4)
    stage.grad_accum_steps = 1
    stage.dtype = "float32"
    stage.remat_policy = "none"
    stage.model = ml_collections.ConfigDict(dict(
        text=dict(text or dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4)),
        logit_scale_init=2.302585092994046, logit_bias_init=-10.0))
    return stage


def get_config(assets_root: str | None = None) -> ml_collections.ConfigDict:
    config = _tiny().get_config(assets_root)
    root = config.assets.root
    config.work_dir = "runs/tower_tiny"
    config.order = ("tower",)
    config.stages = ml_collections.ConfigDict()
    config.stages.tower = tower_stage(root, steps=8, lr=3e-3,
                                      image_size=int(config.assets.image_size), batch_size=8)
    config.final_eval = ml_collections.ConfigDict()
    return config
