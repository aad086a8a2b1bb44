"""python -m convert {to-flax,to-hf} MODEL SRC OUT

  to-flax MODEL HF_DIR OUT_DIR [--allow-pickle]
      config.json + safetensors (single or sharded) -> Orbax params + model_config.json
  to-hf MODEL OUT_DIR HF_DIR [--tokenizer DIR] [--max-shard-size 5GB]
      Orbax model folder -> config.json + safetensors that transformers/diffusers load

MODEL: llama, siglip, siglip_text, unet, vae, sd15 (a diffusers folder's unet/ and vae/), or metamorph
(the authors' MetaMorph folder; to-flax takes --vision-tower SIGLIP_DIR when the folder
holds no SigLIP tower).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from convert import COMPOSITES, SPEC_MODULES, get_spec
from metamorph_jax.input_errors import ArgumentParser, run_command


def parse_size(text: str) -> int:
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not found:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (e.g. 5GB, 500MB)")
    scale = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2,
             "G": 1024**3, "GB": 1024**3}[found.group(2)]
    return int(float(found.group(1)) * scale)


def main(argv=None) -> int:
    """The command: a bad argument, folder or checkpoint is one line `error: ...` and the
    status 2 (metamorph_jax/input_errors.py)."""
    return run_command(command, sys.argv[1:] if argv is None else list(argv))


def command(argv) -> int:
    # Imported here, after run_command has chosen the platform JAX starts on.
    from convert.core import DEFAULT_SHARD_BYTES, flax_to_hf, hf_to_flax
    parser = ArgumentParser(prog="python -m convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sorted(SPEC_MODULES) + sorted(COMPOSITES)
    to_flax = sub.add_parser("to-flax", help="PyTorch checkpoint folder -> Flax/Orbax")
    to_flax.add_argument("model", choices=models)
    to_flax.add_argument("src")
    to_flax.add_argument("out")
    to_flax.add_argument("--allow-pickle", action="store_true",
                         help="accept .bin/.pt files (loaded with torch.load(weights_only=True))")
    to_flax.add_argument("--variant", help="read the weights of this variant, e.g. fp16 "
                                           "(files named model.fp16.safetensors)")
    to_flax.add_argument("--vision-tower", help="metamorph only: a Hugging Face SigLIP folder "
                                                "giving the tower's config (and its weights when "
                                                "the checkpoint has none)")
    to_hf = sub.add_parser("to-hf", help="Flax/Orbax model folder -> PyTorch checkpoint folder")
    to_hf.add_argument("model", choices=models)
    to_hf.add_argument("src")
    to_hf.add_argument("out")
    to_hf.add_argument("--tokenizer", help="folder whose tokenizer files are copied along")
    to_hf.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES)
    args = parser.parse_args(argv)
    if getattr(args, "vision_tower", None) and args.model != "metamorph":
        parser.error("--vision-tower is for metamorph only")

    parts = [(p, p) for p in COMPOSITES[args.model]] if args.model in COMPOSITES else [(args.model, None)]
    for name, subfolder in parts:
        src = Path(args.src) / subfolder if subfolder else Path(args.src)
        out = Path(args.out) / subfolder if subfolder else Path(args.out)
        if args.command == "to-flax" and name == "metamorph":
            from convert.metamorph import checkpoint_to_flax
            checkpoint_to_flax(src, out, vision_tower=args.vision_tower,
                               allow_pickle=args.allow_pickle, variant=args.variant)
        elif args.command == "to-flax":
            hf_to_flax(get_spec(name), src, out, allow_pickle=args.allow_pickle,
                       variant=args.variant)
        else:
            flax_to_hf(get_spec(name), src, out, tokenizer_dir=args.tokenizer,
                       max_shard_bytes=args.max_shard_size)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
