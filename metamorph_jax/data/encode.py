"""Command line: encode the images of record files into a visual token store, once.

    python -m metamorph_jax.data.encode --checkpoint SIGLIP_DIR --input RECORDS[,RECORDS2] \\
        --output TOKENS.array_record [--image-root DIR] [--dtype bfloat16] [--batch-size 8] \\
        [--part-size 4096] [--read-threads 8] [--compute-dtype float32] \\
        [--image-size S --num-image-tokens V] [--coordinator H:P --num-processes N --process-id I]

Then set the data config's `visual_tokens` to TOKENS.array_record: batches carry the stored
tokens instead of pixels (data/token_store.py holds the format). Resumable: the same
command again encodes only what is missing. With several processes (the distributed
flags), each encodes its share over its local devices and process 0 writes the index.

This module is a command-line leaf: it may import the encoder (inference/token_encoder.py),
which runs the SigLIP model; the data library itself never imports models or inference.
"""
from __future__ import annotations

import argparse
import sys

from metamorph_jax import distributed
from metamorph_jax.input_errors import ArgumentParser, run_command


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m metamorph_jax.data.encode",
        description="The frozen SigLIP tower's visual tokens of every image the records "
                    "refer to, written once into a token store (resumable).")
    parser.add_argument("--checkpoint", required=True, metavar="SIGLIP_DIR",
                        help="a 'siglip' model folder (python -m convert to-flax siglip ...)")
    parser.add_argument("--input", required=True, action="append", metavar="RECORDS",
                        help="record file(s) (.jsonl, .json, .array_record); repeat the flag "
                             "or separate with commas")
    parser.add_argument("--output", required=True, metavar="TOKENS.array_record",
                        help="the store folder (created; a started one is resumed)")
    parser.add_argument("--image-root", default=None,
                        help="folder relative image paths are relative to (default: each "
                             "record file's folder, as in training); keys are absolute paths")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="stored dtype (default bfloat16)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per device per step")
    parser.add_argument("--part-size", type=int, default=4096,
                        help="images per committed part (what a stop can lose)")
    parser.add_argument("--read-threads", type=int, default=8, help="image decoding threads")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the tower's compute dtype")
    parser.add_argument("--image-size", type=int, default=None,
                        help="the data config's image_size: refused if the tower's differs")
    parser.add_argument("--num-image-tokens", type=int, default=None,
                        help="the data config's num_image_tokens: refused if the tower's differs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    args.input = [p for value in args.input for p in value.split(",") if p]
    for flag in ("batch_size", "part_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    """The command: a bad flag, record file, image or store is one line `error: ...` and
    the status 2 (metamorph_jax/input_errors.py)."""
    return run_command(command, sys.argv[1:] if argv is None else list(argv))


def command(argv) -> int:
    args = parse_args(argv)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from metamorph_jax.inference.token_encoder import encode
    result = encode(args.checkpoint, args.input, args.output, image_root=args.image_root,
                    dtype=args.dtype, batch_size=args.batch_size, part_size=args.part_size,
                    read_threads=args.read_threads, compute_dtype=args.compute_dtype,
                    image_size=args.image_size, num_image_tokens=args.num_image_tokens,
                    progress=not args.no_progress)
    print(f"{args.output}: {result['images']} images; encoded {result['encoded']} now, "
          f"{result['already']} were already stored" + (" (index written)"
                                                       if result["index"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
