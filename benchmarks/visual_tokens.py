"""Visual tokens computed once (data/token_store.py) against pixels in every step.

  python -m benchmarks.visual_tokens [--scenes 200] [--batches 4] [--seq-len 4096] \
      [--batch 2] [--max-images 16] [--steps 5] [--rounds 3]

Printed, all measured in this process unless marked as an estimate:

1. bytes per image on disk: a store of So400m-shaped tokens (64 x 1152) in bfloat16,
   float16 and float32 (file sizes / images), beside the source PNG and the 384 px uint8
   pixels a batch carries per image;
2. the cosine loss of the reduced precision: 1 - cos between a tower's fp32 tokens and
   the same tokens stored in bf16 / fp16 (a random 1-layer tower of So400m's width 1152,
   patch 14, at 112 px: an 8 x 8 grid = 64 tokens, L2-normalised as MetaMorph's);
3. records/s through the pipeline (render + pack, in this process) with pixels (decode +
   resize to 384 px, uint8 as configs/metamorph_llama3.py) against stored tokens (a bf16
   store of random unit tokens for every image of the world: reading cost only), and
   each against an 8B host's demand (estimate; records_per_s_8b below);
4. the tiny-config instruct train step (configs/tiny.py's model sizes: LLaMA d=64 x 2
   layers, SigLIP d=32 x 2 layers at 16 px, 4 tokens; batch 8 x 128; value_and_grad +
   AdamW over all but the tower) with pixels against tokens from a store the encoder wrote,
   timed in alternating rounds (either side drifts on a shared machine).

The 8B host's demand (an estimate, not a measurement): LLaMA-3 8B training at
6 * 8.0e9 FLOPs per token plus attention (12 * 32 layers * seq_len * 4096 per token), on 8
H200 at 40% MFU of 989 TFLOP/s (bf16 dense), i.e. 3.17e15 FLOP/s per host; with pixels the
step also runs the frozen So400m forward (2 * 0.4e9 * 729 FLOPs per image), with stored
tokens it does not. records/s = host FLOP/s / FLOPs per record, at the tokens and images
per record measured on this benchmark's Shapes records.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

H200_BF16_FLOPS = 989e12
MFU = 0.4
GPUS_PER_HOST = 8
LLAMA_8B = dict(params=8.0e9, layers=32, d_model=4096)
SIGLIP_FLOPS_PER_IMAGE = 2 * 0.4e9 * 729


def flops_per_token(seq_len: int) -> float:
    return 6 * LLAMA_8B["params"] + 12 * LLAMA_8B["layers"] * seq_len * LLAMA_8B["d_model"]


def records_per_s_8b(tokens_per_record: float, images_per_record: float, seq_len: int,
                     tower_in_step: bool) -> float:
    per_record = tokens_per_record * flops_per_token(seq_len)
    if tower_in_step:
        per_record += images_per_record * SIGLIP_FLOPS_PER_IMAGE
    return GPUS_PER_HOST * MFU * H200_BF16_FLOPS / per_record


def random_store(path: Path, keys, dtype: str, shape=(64, 1152), seed: int = 0):
    """A complete store of random unit tokens for `keys` (what reading costs; the values
    are not a tower's)."""
    from metamorph_jax.data import token_store
    store = token_store.prepare(path, {"format": token_store.FORMAT,
                                       "version": token_store.VERSION, "dtype": dtype,
                                       "shape": list(shape), "image_size": 384, "tower": {},
                                       "tower_dir": "random"})
    rng = np.random.default_rng(seed)
    writer = token_store.PartWriter(store, 0, dtype, shape, part_size=4096)
    for key in keys:
        tokens = rng.standard_normal(shape).astype(np.float32)
        writer.add(key, tokens / np.linalg.norm(tokens, axis=-1, keepdims=True))
    writer.close()
    token_store.finalize(store, keys)
    return token_store.TokenStore(store)


def precision_loss(paths) -> dict:
    """1 - cos of bf16 / fp16 storage of a So400m-width tower's tokens (see docstring)."""
    import flax.linen as nn
    import jax
    import ml_dtypes

    from metamorph_jax.data import images as images_lib
    from metamorph_jax.models import siglip
    config = siglip.SiglipConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1,
                                 num_attention_heads=16, image_size=112, patch_size=14,
                                 use_head=False, num_visual_tokens=64)
    params = nn.unbox(jax.jit(lambda r: siglip.init_params(config, r))(jax.random.key(0)))
    tower = siglip.SiglipVisionModel(config)
    pixels = np.stack([images_lib.load_image(p, config.image_size) for p in paths])
    tokens = np.asarray(jax.jit(lambda p, x: tower.apply({"params": p}, x,
                                                         method=tower.visual_tokens))(params, pixels))
    tokens = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    out = {}
    for name, dtype in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        stored = tokens.astype(np.float32).astype(dtype).astype(np.float64)
        cos = (tokens * stored).sum(-1) / (np.linalg.norm(tokens, axis=-1)
                                           * np.linalg.norm(stored, axis=-1))
        out[name] = (float(np.mean(1 - cos)), float(np.max(1 - cos)))
    return out


def measure_pipeline(sources, tokenizer, ids, config, batches: int) -> dict:
    from metamorph_jax.data import pipeline as P
    iterator = P.make_iterator(sources, tokenizer, ids, config)
    next(iterator)   # start-up and the first fill
    records = tokens = images = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        records += int(batch["segment_ids"].max(axis=1).sum())
        tokens += int((batch["segment_ids"] > 0).sum())
        images += int(batch["image_valid"].sum())
    seconds = time.perf_counter() - start
    return {"records_per_s": records / seconds, "tokens_per_record": tokens / records,
            "images_per_record": images / records}


def tiny_instruct_step(world: Path, sources, steps: int, rounds: int) -> dict:
    """Seconds per tiny instruct step with pixels and with stored tokens (alternating)."""
    import flax.linen as nn
    import jax
    import optax

    from metamorph_jax import pretrained, tiny
    from metamorph_jax.data import conversation as conv
    from metamorph_jax.data import pipeline as P
    from metamorph_jax.data.testing import build_tiny_tokenizer
    from metamorph_jax.inference import token_encoder
    from metamorph_jax.models import metamorph
    from metamorph_jax.training.vpit_loss import vpit_loss

    tokenizer = build_tiny_tokenizer(tiny._shapes_words(world))
    ids = conv.add_image_tokens(tokenizer)
    vision = tiny.tiny_siglip_config(image_size=16)
    config = metamorph.MetaMorphConfig(
        llm=tiny.tiny_llama_config(tokenizer, vocab_size=len(tokenizer)), vision=vision,
        num_image_tokens=vision.num_visual_tokens, image_start_id=ids.image_start_id,
        image_end_id=ids.image_end_id)
    params = nn.unbox(jax.jit(lambda r: metamorph.init_params(config, r))(jax.random.key(0)))
    folder = world.parent / "tiny_siglip"
    pretrained.save_pretrained(folder, "siglip", vision.to_dict(),
                               jax.tree.map(np.asarray, params["vision_tower"]))
    store = world.parent / "tiny_tokens.array_record"
    token_encoder.encode(folder, [s.path for s in sources], store, image_root=str(world),
                         dtype="float32", progress=False)
    model = metamorph.MetaMorph(config)
    optimizer = optax.adamw(1e-3)
    frozen = params.pop("vision_tower")
    trainable = params

    def loss_fn(trainable, batch):
        return vpit_loss(model, {**trainable, "vision_tower": frozen}, batch)[0]

    @jax.jit
    def step(trainable, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    base = dict(seq_len=128, batch_size=8, num_image_tokens=4, image_size=16,
                max_images_per_row=8, num_epochs=None, shard_index=0, shard_count=1)
    batches = {}
    for name, extra in (("pixels", {}), ("tokens", {"visual_tokens": str(store)})):
        batch = next(P.make_iterator(sources, tokenizer, ids, P.DataConfig(**base, **extra)))
        keys = [k for k in batch if k not in ("record_ids", "image_valid")]
        batches[name] = {k: jax.numpy.asarray(batch[k]) for k in keys}
    times = {name: [] for name in batches}
    states = {name: (trainable, optimizer.init(trainable)) for name in batches}
    for name, batch in batches.items():   # compile
        jax.block_until_ready(step(*states[name], batch))
    for _ in range(rounds):
        for name, batch in batches.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(steps):
                *state, loss = step(*state, batch)
            jax.block_until_ready(loss)
            times[name].append((time.perf_counter() - start) / steps)
            states[name] = tuple(state)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--max-images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from metamorph_jax.data import conversation as conv
    from metamorph_jax.data import pipeline as P
    from metamorph_jax.data import shapes
    from metamorph_jax.data.testing import build_tiny_tokenizer
    from metamorph_jax.inference.token_encoder import list_images

    root = Path(tempfile.mkdtemp(prefix="visual_tokens_bench_"))
    world = root / "shapes"
    shapes.write_world(str(world), shapes.WorldConfig(
        seed=0, image_size=64, scenes=(("train", args.scenes),),
        clips=(("train", max(10, args.scenes // 10)),)), progress=False)
    kinds = {"image_qa": 6, "video_qa": 1, "text_to_image": 2, "image_to_image": 1, "video": 1,
             "visual_thinking": 1}
    sources = [P.Source(str(world / "train" / f"{kind}.jsonl"), weight=w, image_root=str(world))
               for kind, w in kinds.items()]
    refs = list_images([s.path for s in sources], str(world), progress=False)
    keys = [ref.key for ref in refs]
    print(f"world: {len(keys)} distinct images in {args.scenes} scenes' records")

    # 1. bytes per image on disk
    sample = keys[:64]
    sizes = {}
    for dtype in ("bfloat16", "float16", "float32"):
        store = random_store(root / f"size_{dtype}.array_record", sample, dtype)
        sizes[dtype] = store.bytes_on_disk() / len(store)
    png = np.mean([os.path.getsize(world / key) for key in sample])
    print("bytes per image on disk: " + ", ".join(
        f"{d} tokens {b:,.0f} ({b / (64 * 1152):.3f} per value)" for d, b in sizes.items())
          + f"; source PNG (64 px Shapes) {png:,.0f}; 384 px uint8 pixels in a batch "
          f"{384 * 384 * 3:,}; float32 pixels {384 * 384 * 3 * 4:,}")

    # 2. cosine loss of the stored precision
    loss = precision_loss([world / key for key in keys[:32]])
    print("1 - cos of stored vs fp32 tokens (2048 tokens of width 1152): " + ", ".join(
        f"{d} mean {m:.2e} max {x:.2e}" for d, (m, x) in loss.items()))

    # 3. records/s through the pipeline, pixels vs tokens
    tokenizer = build_tiny_tokenizer()
    ids = conv.add_image_tokens(tokenizer)
    store = random_store(root / "tokens.array_record", keys, "bfloat16")
    base = dict(seq_len=args.seq_len, batch_size=args.batch, num_image_tokens=64,
                image_size=384, max_images_per_row=args.max_images, num_epochs=None,
                read_threads=1, shard_index=0, shard_count=1)
    configs = {"pixels (uint8 384 px)": P.DataConfig(**base, image_dtype="uint8"),
               "tokens (bf16 store)": P.DataConfig(**base, visual_tokens=str(store.path))}
    results = {name: [] for name in configs}
    for _ in range(2):   # alternating, as the machine drifts
        for name, config in configs.items():
            results[name].append(measure_pipeline(sources, tokenizer, ids, config, args.batches))
    print(f"pipeline, one process, in-process decoding, {args.batch} x {args.seq_len} rows:")
    per_s = {}
    for name, runs in results.items():
        r = max(runs, key=lambda run: run["records_per_s"])
        per_s[name] = r["records_per_s"]
        need = records_per_s_8b(r["tokens_per_record"], r["images_per_record"], args.seq_len,
                                tower_in_step=name.startswith("pixels"))
        print(f"  {name}: {r['records_per_s']:.1f} records/s ({r['tokens_per_record']:.0f} "
              f"tokens, {r['images_per_record']:.2f} images per record); 8B host demand "
              f"(estimate) {need:.1f} records/s -> pipeline/demand {r['records_per_s'] / need:.3f}")
    names = list(per_s)
    print(f"  tokens / pixels records/s: {per_s[names[1]] / per_s[names[0]]:.2f}x")
    print(f"  8B host (estimate): {flops_per_token(args.seq_len):.3g} FLOP per token, "
          f"{MFU * H200_BF16_FLOPS / flops_per_token(args.seq_len):,.0f} tokens/s per H200 "
          f"at {MFU:.0%} MFU, {GPUS_PER_HOST} per host")

    # 4. the tiny instruct step
    times = tiny_instruct_step(world, sources, args.steps, args.rounds)
    print(f"tiny instruct step (8 x 128, median of {args.rounds} rounds of {args.steps}): "
          f"pixels {times['pixels'] * 1e3:.1f} ms, tokens {times['tokens'] * 1e3:.1f} ms, "
          f"pixels / tokens {times['pixels'] / times['tokens']:.2f}x")


if __name__ == "__main__":
    main()
