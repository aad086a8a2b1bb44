"""The paper's MetaMorph recipe (REFERENCE.md, "Training recipe") in the stage schema:
VPiT stage 1 (adapter), VPiT stage 2 (instruct) and the SD 1.5 decoder, for LLaMA-3 8B or
70B, on a TPU v5p or v6e pod or on 8xH100 nodes. configs/metamorph_llama3_8b.py and
metamorph_llama3_70b.py call `recipe`; the topology is the config argument:

    python train.py --config configs/metamorph_llama3_8b.py:v5p-256 --workdir /gcs/BUCKET/...  (a mounted bucket)
    python train.py --config configs/metamorph_llama3_70b.py:h100x8:16 --workdir /runs/...

Topologies: "v5p-N" (N TensorCores: N/2 chips, 4 chips and one process per host), "v6e-N"
(N chips, 4 and one process per host) and "h100x8:NODES" (8 GPUs and one process per node). The global batch is the paper's
(`data.batch_size` is per process and per micro-batch: global = batch_size x processes x
grad_accum_steps); where a device cannot hold its share of the batch at 4096 tokens, the
batch is accumulated over micro-batches; where the batch does not divide over the devices
it is rounded up to the next multiple and the lr scaled by sqrt(batch / recipe batch), the
authors' rule (their 448 at 3.74e-5 is the paper's 768 at 4.90e-5 under it). Steps: the
VPiT stages read every record of every source once (num_epochs=1; the instruct stage's six
sources as one shuffled concatenation, as the paper trains), and `steps=0` sizes the
schedule from a counting pass over the data before each stage (training/epoch_steps.py;
`train.py ... --dry-run` prints the records and steps per stage and source). Where the paper and the authors' code disagree
the code's value is the default and the paper's is kept under the stage's `reference`.
"""
import importlib.util
from pathlib import Path

import ml_collections
from ml_collections import config_dict

# Rows of 4096 tokens (decoder: 512px images) one device holds per micro-batch with bf16
# compute and full remat. v5p's LLM rows are measured by `train.py --plan` (docs/pods.md:
# 8B at 12 rows peaks at 69 GB of 95, 70B at 2 rows on tensor=4 at 25 GB); v6e's (32 GB)
# are scaled from them by HBM; the GPU rows and the decoder's are estimates.
ROWS_PER_DEVICE = {("8b", "v5p"): 12, ("70b", "v5p"): 2, ("8b", "v6e"): 4, ("70b", "v6e"): 2,
                   ("8b", "h100"): 4, ("70b", "h100"): 1,
                   ("decoder", "v5p"): 32, ("decoder", "v6e"): 8, ("decoder", "h100"): 16}
# Paper (REFERENCE.md): per-stage lr and batch; stage 1 defaults to the code's numbers.
RECIPE = {
    "8b": dict(adapter=dict(lr=3.74e-5, batch=448, paper_lr=4.90e-5, paper_batch=768),
               instruct=dict(lr=6.93e-5, batch=1536)),
    "70b": dict(adapter=dict(lr=3.74e-5, batch=448, paper_lr=4.90e-5, paper_batch=768),
                instruct=dict(lr=4.90e-5, batch=768)),
}


def parse_topology(topology: str) -> dict:
    """{"kind", "devices", "processes"} of "v5p-N", "v6e-N" or "h100x8:NODES"."""
    if topology.startswith("v5p-"):
        chips = int(topology[len("v5p-"):]) // 2
        return {"kind": "v5p", "devices": chips, "processes": max(1, chips // 4)}
    if topology.startswith("v6e-"):                  # Trillium: N chips, 4 per host
        chips = int(topology[len("v6e-"):])
        return {"kind": "v6e", "devices": chips, "processes": max(1, chips // 4)}
    if topology.startswith("h100x8:"):
        nodes = int(topology[len("h100x8:"):])
        return {"kind": "h100", "devices": 8 * nodes, "processes": nodes}
    raise ValueError(f"topology {topology!r}: use v5p-N, v6e-N or h100x8:NODES")


def mesh_for(size: str, topology: dict) -> dict:
    """ZeRO-3 (fsdp) over every device, as the paper trains; 70B on GPUs also splits heads
    over the 8 GPUs of a node (tensor), on TPUs over 4 chips."""
    if size == "8b":
        return dict(data=1, fsdp=-1, tensor=1)
    return dict(data=1, fsdp=-1, tensor=8 if topology["kind"] == "h100" else 4)


def split_batch(global_batch: int, size: str, topology: dict, mesh: dict
                ) -> tuple[int, int, int]:
    """(global batch rounded up to the devices, rows per process per micro-batch,
    grad_accum_steps) for a recipe's `global_batch` rows."""
    data_ways = topology["devices"] // mesh["tensor"]
    per_device = -(-global_batch // data_ways)                       # rows each device sees
    # As few micro-batches as the device's rows allow, then rows spread evenly over them
    # (24 rows at a cap of 10 are 3 x 8, not 3 x 10).
    accum = -(-per_device // ROWS_PER_DEVICE[(size, topology["kind"])])
    micro = -(-per_device // accum)
    per_device = micro * accum
    return per_device * data_ways, micro * data_ways // topology["processes"], accum


def _decoder_stage():
    spec = importlib.util.spec_from_file_location(
        "decoder_sd15", Path(__file__).with_name("decoder_sd15.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.decoder_stage()


def vpit_data(sources: dict, batch_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        sources=ml_collections.ConfigDict(sources), seq_len=4096, batch_size=batch_size,
        num_image_tokens=64, image_size=384, image_dtype="uint8", max_images_per_row=16,
        template="llama3", seed=0, num_epochs=1, worker_count=16, strict=False,
        # Videos: 1 fps; no max_video_frames, so a clip is sampled to at most
        # DataConfig.video_frame_budget() = min(16 slots, 4096 // 2 // 66) = 16 frames
        # (1056 positions), spread evenly over the whole clip. A source losing more than
        # max_bad_fraction (default 0.01) of its records stops the run, naming it.
        # a token store (python -m metamorph_jax.data.encode) to read instead of pixels
        visual_tokens=config_dict.placeholder(str)))


def vpit_stage(kind: str, size: str, topology: dict, mesh: dict, sources: dict,
               init: dict) -> ml_collections.ConfigDict:
    recipe = RECIPE[size][kind]
    global_batch, batch_size, accum = split_batch(recipe["batch"], size, topology, mesh)
    lr = recipe["lr"] * (global_batch / recipe["batch"]) ** 0.5
    stage = ml_collections.ConfigDict()
    stage.kind = kind
    # 0: one pass over the data (num_epochs=1: every record of every source once), the
    # steps counted from the records' lengths before the stage starts (epoch_steps.py);
    # `python train.py --config ... --dry-run` prints them
    stage.steps = 0
    stage.allow_short = False   # finite data ending before `steps` is an error
    # llm_arch / vision_arch: what a plan (train.py --plan) builds where the folders are
    # absent (metamorph_jax/architectures.py); a run reads the folders.
    stage.init = ml_collections.ConfigDict(dict(
        dict(llm_dir="", vision_dir="", tokenizer_dir="", model_dir="", from_previous=False,
             seed=0, llm_arch=f"llama3.1_{size}", vision_arch="siglip_so400m", model_arch=""),
        **init))
    stage.data = vpit_data(sources, batch_size)
    stage.eval_data = ml_collections.ConfigDict(dict(sources={}))
    stage.optim = ml_collections.ConfigDict(dict(
        lr=lr, schedule="warmup_cosine", warmup=0.03, end_ratio=0.0,
        decay_end_step=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0))
    stage.reference = ml_collections.ConfigDict(dict(
        recipe_lr=recipe["lr"], recipe_batch=recipe["batch"], global_batch=global_batch,
        **{k: v for k, v in recipe.items() if k.startswith("paper_")}))
    stage.grad_accum_steps = accum
    stage.dtype = "bfloat16"
    stage.remat_policy = "full"
    stage.vision_coef = 1.0
    # The LM head and loss over 1024-position chunks: a micro-batch's [rows, 4096, 128258]
    # logits never exist whole (the plan of issue 13 measured them on every chip).
    stage.loss_chunk_tokens = 1024
    return stage


def recipe(size: str, topology_name: str) -> ml_collections.ConfigDict:
    topology = parse_topology(topology_name)
    mesh = mesh_for(size, topology)
    config = ml_collections.ConfigDict()
    config.work_dir = f"runs/metamorph_llama3_{size}"
    config.seed = 0
    config.mesh = ml_collections.ConfigDict(mesh)
    config.order = ("adapter", "instruct", "decoder")
    config.checkpoint_every = 500
    config.keep = 3
    config.async_checkpoints = True
    config.log_every = 10
    config.eval_every = 500
    config.eval_batches = 8
    config.skip_nonfinite = False
    # One data shard per process of the topology, fixed: `train.py --dry-run` (one process)
    # counts the steps of the run's shards.
    config.data_shards = topology["processes"]
    config.assets = ml_collections.ConfigDict(dict(kind=""))
    checkpoints = f"checkpoints/llama3_{size}"
    config.stages = ml_collections.ConfigDict()
    config.stages.adapter = vpit_stage(
        "adapter", size, topology, mesh,
        {"captions": dict(path="data/stage1/image_captions.jsonl", weight=1.0)},
        dict(llm_dir=f"{checkpoints}/llama3_instruct_flax",
             vision_dir="checkpoints/siglip_so400m_384_flax",
             tokenizer_dir=f"{checkpoints}/llama3_instruct_hf"))
    config.stages.instruct = vpit_stage(
        "instruct", size, topology, mesh,
        {kind: dict(path=f"data/stage2/{kind}.array_record", weight=1.0)
         for kind in ("image_qa", "video_qa", "text_to_image", "image_to_image", "video",
                      "visual_thinking")},
        dict(from_previous=True))
    decoder = _decoder_stage()
    decoder.init.vision_dir = "checkpoints/siglip_so400m_384_flax"
    decoder.init.vision_arch = "siglip_so400m"
    decoder.init.unet_dir = "checkpoints/sd15_unet_flax"
    decoder.init.vae_dir = "checkpoints/sd15_vae_flax"
    decoder.data.sources.images.path = "data/decoder/images.jsonl"
    # The paper's 2112 images, rounded up to a multiple of the devices (lr as the paper's).
    decoder_mesh = dict(mesh, tensor=1)
    _, decoder.data.batch_size, decoder.grad_accum_steps = split_batch(
        2112, "decoder", topology, decoder_mesh)
    config.stages.decoder = decoder
    return config
