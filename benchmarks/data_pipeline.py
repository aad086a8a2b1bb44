"""Data pipeline throughput (decode, preprocess, render, pack) against what training eats.

  python -m benchmarks.data_pipeline [--scenes 400] [--batches 8] [--batch 4] \
      [--seq-len 1024] [--image-size 384] [--workers 0,1,2] [--dtypes float32,uint8]

Data: a Shapes world written to a temporary folder (64 px PNGs, all six kinds mixed),
preprocessed to the SigLIP resolution (384 px; float32 normalised, or uint8 to be
normalised on the device) and packed into rows of `--seq-len` tokens with 64 visual
tokens per image. The tokenizer is the tiny word-level test
tokenizer (no LLaMA-3 tokenizer can be downloaded here), so text tokenization is cheaper
than with the real one; images dominate the cost.

Printed per worker count: records/s, tokens/s, images/s (after the first batch, which
pays for starting the workers), and the ratio to what one training step consumes:

- tiny: a jit-compiled training step (forward, backward, AdamW) of a tiny LLaMA decoder
  (hidden 256, 4 layers) on the same packed batch shape, timed in this process on this
  CPU. The SigLIP tower is not included, so the real step is slower than this.
- 8B: an estimate, not a measurement: LLaMA-3 8B training at 6 * 8.0e9 FLOPs per token
  plus attention (12 * layers * seq_len * d_model per token) and the frozen SigLIP
  forward (2 * 0.4e9 * 729 FLOPs per image), on 8 H200 per host at 40% of 989 TFLOP/s.

ratio = pipeline records/s on one host / records/s the step consumes; above 1 the
pipeline keeps up.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time



from metamorph_jax.data import conversation as conv
from metamorph_jax.data import images as images_lib
from metamorph_jax.data import pipeline as P
from metamorph_jax.data import shapes
from metamorph_jax.data.testing import build_tiny_tokenizer

KIND_WEIGHTS = {"image_qa": 6, "video_qa": 1, "text_to_image": 2, "image_to_image": 1,
                "video": 1, "visual_thinking": 1}


def count_records(batch) -> int:
    return int(batch["segment_ids"].max(axis=1).sum())


def measure_pipeline(sources, tokenizer, ids, config, batches: int) -> dict:
    iterator = P.make_iterator(sources, tokenizer, ids, config)
    try:
        start = time.perf_counter()
        next(iterator)  # worker start-up and first fill
        first = time.perf_counter() - start
        records = tokens = images = 0
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
            records += count_records(batch)
            tokens += int((batch["segment_ids"] > 0).sum())
            images += int(batch["image_valid"].sum())
        seconds = time.perf_counter() - start
    finally:
        iterator.close()
    return {"first_batch_s": first, "records_per_s": records / seconds, "tokens_per_s": tokens / seconds,
            "images_per_s": images / seconds, "tokens_per_record": tokens / records,
            "images_per_record": images / records, "records_per_batch": records / batches,
            "batch_s": seconds / batches}


def tiny_step_seconds(vocab_size: int, batch: dict, repeats: int = 3) -> float:
    import jax
    import jax.numpy as jnp
    import optax
    from metamorph_jax.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=8192)
    model = LlamaForCausalLM(config)
    arrays = {k: jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids", "text_targets",
                                                  "text_mask")}
    params = model.init(jax.random.PRNGKey(0), arrays["tokens"][:1, :16],
                        positions=arrays["positions"][:1, :16])["params"]
    optimizer = optax.adamw(1e-4)
    state = optimizer.init(params)

    def loss_fn(params, b):
        logits = model.apply({"params": params}, b["tokens"], positions=b["positions"],
                             segment_ids=b["segment_ids"]).logits
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, b["text_targets"])
        mask = b["text_mask"].astype(jnp.float32)
        return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    @jax.jit
    def step(params, state, b):
        loss, grads = jax.value_and_grad(loss_fn)(params, b)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state, loss = step(params, state, arrays)  # compile
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(repeats):
        params, state, loss = step(params, state, arrays)
    jax.block_until_ready(loss)
    return (time.perf_counter() - start) / repeats


def records_per_s_8b(tokens_per_record: float, images_per_record: float, seq_len: int) -> float:
    layers, d_model, params = 32, 4096, 8.0e9
    flops_per_token = 6 * params + 12 * layers * seq_len * d_model
    flops_per_image = 2 * 0.4e9 * 729
    flops_per_record = tokens_per_record * flops_per_token + images_per_record * flops_per_image
    host_flops = 8 * 0.4 * 989e12
    return host_flops / flops_per_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--max-images", type=int, default=12)
    parser.add_argument("--dtypes", default="float32,uint8")
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="shapes_bench_")
    world = shapes.WorldConfig(seed=0, image_size=64, scenes=(("train", args.scenes),),
                               clips=(("train", max(10, args.scenes // 10)),))
    shapes.write_world(folder, world, progress=False)
    tokenizer = build_tiny_tokenizer()
    ids = conv.add_image_tokens(tokenizer)
    sources = [P.Source(os.path.join(folder, "train", f"{kind}.jsonl"), weight=w, image_root=folder)
               for kind, w in KIND_WEIGHTS.items()]

    # Pieces, in this process: one image decode + preprocess; one record rendered.
    paths = sorted(os.path.join(folder, "images", "train", n)
                   for n in os.listdir(os.path.join(folder, "images", "train")))[:50]
    start = time.perf_counter()
    for path in paths:
        images_lib.load_image(path, args.image_size)
    image_ms = (time.perf_counter() - start) / len(paths) * 1e3
    print(f"decode + preprocess one 64px PNG to {args.image_size}px float32: {image_ms:.2f} ms")

    results = {}
    for dtype in args.dtypes.split(","):
        for workers in [int(w) for w in args.workers.split(",")]:
            config = P.DataConfig(seq_len=args.seq_len, batch_size=args.batch, num_image_tokens=64,
                                  image_size=args.image_size, image_dtype=dtype,
                                  max_images_per_row=args.max_images, num_epochs=None,
                                  worker_count=workers, worker_buffer_size=8, read_threads=1,
                                  shard_index=0, shard_count=1)
            r = results[(dtype, workers)] = measure_pipeline(sources, tokenizer, ids, config, args.batches)
            print(f"{dtype} workers={workers}: {r['records_per_s']:.1f} records/s, "
                  f"{r['tokens_per_s']:.0f} tokens/s, {r['images_per_s']:.1f} images/s, "
                  f"{r['batch_s']:.2f} s/batch ({r['records_per_batch']:.1f} records, "
                  f"{r['tokens_per_record']:.0f} tokens and {r['images_per_record']:.2f} images "
                  f"per record; first batch {r['first_batch_s']:.1f} s)")

    # What training consumes, per step of this batch shape.
    config = P.DataConfig(seq_len=args.seq_len, batch_size=args.batch, num_image_tokens=64,
                          image_size=args.image_size, max_images_per_row=args.max_images,
                          num_epochs=None, shard_index=0, shard_count=1)
    iterator = P.make_iterator(sources, tokenizer, ids, config)
    batch = next(iterator)
    step_s = tiny_step_seconds(len(tokenizer), batch)
    reference = next(iter(results.values()))
    tiny_need = reference["records_per_batch"] / step_s
    big_need = records_per_s_8b(reference["tokens_per_record"], reference["images_per_record"], args.seq_len)
    print(f"tiny LLaMA train step on this CPU ({args.batch}x{args.seq_len}): {step_s:.2f} s "
          f"-> consumes {tiny_need:.1f} records/s")
    print(f"8B estimate, 8 H200 per host: consumes {big_need:.1f} records/s per host")
    for (dtype, workers), r in results.items():
        print(f"{dtype} workers={workers}: ratio pipeline/tiny = {r['records_per_s'] / tiny_need:.2f}, "
              f"pipeline/8B-host = {r['records_per_s'] / big_need:.3f}")


if __name__ == "__main__":
    main()
