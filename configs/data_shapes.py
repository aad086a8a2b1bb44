"""Data settings for training on the built-in Shapes world (all six VPiT kinds).

Write the world first:  python -m metamorph_jax.data.shapes --out data/shapes
Use:  sources, data_config = pipeline.from_config(get_config())
"""
import ml_collections

KIND_WEIGHTS = (("image_qa", 6.0), ("video_qa", 1.0), ("text_to_image", 2.0),
                ("image_to_image", 1.0), ("video", 1.0), ("visual_thinking", 1.0))


def get_config(root: str = "data/shapes", split: str = "train") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.sources = [dict(path=f"{root}/{split}/{kind}.jsonl", weight=weight, image_root=root)
                      for kind, weight in KIND_WEIGHTS]
    config.seq_len = 1024
    config.batch_size = 8
    config.num_image_tokens = 64
    config.image_size = 384
    config.image_dtype = "float32"
    config.max_images_per_row = 12
    config.template = "llama3"
    config.seed = 0
    config.num_epochs = None
    config.worker_count = 2
    config.strict = False
    return config
