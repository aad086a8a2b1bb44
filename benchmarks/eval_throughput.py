"""Whole-evaluation throughput of eval.py's benchmark path: samples per second on a
Shapes-like benchmark at generator batch 1 and 16, and the share of the time spent
decoding against the rest (reading the benchmark file, decoding and resizing images,
building prompts, extracting and scoring answers, writing predictions).

  python -m benchmarks.eval_throughput [--samples 64] [--max-new-tokens 8]

The benchmark is a generic JSONL made from a small Shapes world's held-out (validation)
image_qa records (data/shapes.py write_world, 16x16 images); the model is the tests'
tiny random MetaMorph folder (tests/vpit_helpers.save_tiny_folders: 2-layer LLaMA of
width 32, 2-layer SigLIP, 4 visual tokens per image). Each batch size is first run over
all samples into a scratch folder, so that every (batch, prompt width) bucket is compiled
before timing; the timed run is runner.evaluate over all samples with the VPiT answerer
(eval.py's path, one process) into a fresh folder.

The last row decodes batch 16 with the rows split over all of the process's local devices
(VPiTGenerator(devices=jax.local_devices()), eval.py's default) and prints its samples/s
against the one-device batch-16 row of the same run. On simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8) that ratio measures the cost of the
partitioned program's plumbing on the same cores, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax


def shapes_benchmark(root: Path, samples: int) -> Path:
    """A generic JSONL of the world's validation image_qa records."""
    from metamorph_jax.data.shapes import WorldConfig, write_world

    world = root / "world"
    write_world(str(world), WorldConfig(image_size=16, scenes=(("train", 0), ("validation", samples)),
                                        clips=(("train", 0), ("validation", 0))), progress=False)
    rows = []
    for line in (world / "validation" / "image_qa.jsonl").read_text().splitlines():
        record = json.loads(line)
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        rows.append({"id": record["id"], "image": str(world / record["image"]),
                     "question": question, "answer": record["conversations"][1]["value"]})
    path = root / "shapes_qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args(argv)

    from metamorph_jax.evaluation import benchmarks, runner
    from metamorph_jax.evaluation.eval_cli import load
    from metamorph_jax.evaluation.vpit_answers import VPiTAnswerer
    from metamorph_jax.inference.vpit_generate import VPiTGenerator, VPiTSampling
    from tests.vpit_helpers import save_tiny_folders

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, _ = save_tiny_folders(root / "models")
        data = shapes_benchmark(root, args.samples)
        start = time.perf_counter()
        samples, _ = benchmarks.read("jsonl", data)
        read_s = time.perf_counter() - start
        loaded = load(model_dir, render=False)
        sampling = VPiTSampling(max_new_tokens=args.max_new_tokens, max_new_images=0)
        print(f"{len(samples)} samples, {args.max_new_tokens} new tokens at most, "
              f"{jax.device_count()} {jax.default_backend()} device(s); reading the file: "
              f"{read_s * 1000:.1f} ms")
        print(f"{'batch':>5} {'samples/s':>10} {'total s':>8} {'decode s':>9} {'decode %':>9} "
              f"{'other s':>8}  devices")
        one = loaded.generator
        split = VPiTGenerator(one.model, one.params, one.eos_token_ids, one.pad_token_id,
                              devices=jax.local_devices())
        rates = {}
        runs = [(int(b), one, "one") for b in args.batches.split(",")]
        runs.append((16, split, "all"))
        for batch, generator, label in runs:
            warm = VPiTAnswerer(generator, loaded.tokenizer, loaded.template, sampling)
            runner.evaluate({"jsonl": data}, root / f"warm{batch}_{label}", generate=warm,
                            batch_size=batch)
            answerer = VPiTAnswerer(generator, loaded.tokenizer, loaded.template, sampling)
            start = time.perf_counter()
            runner.evaluate({"jsonl": data}, root / f"run{batch}_{label}", generate=answerer,
                            batch_size=batch)
            total = time.perf_counter() - start
            decode = answerer.decode_seconds
            rates[(batch, label)] = len(samples) / total
            print(f"{batch:>5} {len(samples) / total:>10.2f} {total:>8.2f} {decode:>9.2f} "
                  f"{100 * decode / total:>8.1f}% {total - decode:>8.2f}  "
                  f"{generator.device_count:>7}")
        if (16, "one") in rates:
            print(f"batch 16 over {split.device_count} local devices / one device: "
                  f"{rates[(16, 'all')] / rates[(16, 'one')]:.2f}x samples/s")


if __name__ == "__main__":
    main()
