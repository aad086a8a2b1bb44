"""Text generation from a converted LLM.

  python generate.py --llm OUT_DIR --tokenizer DIR --prompt "..." [--chat]
      [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]

Greedy by default (temperature 0); stops at the model's and tokenizer's end tokens.
"""
from __future__ import annotations

import argparse
import sys

from metamorph_jax.inference import text_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", required=True, help="converted model folder (python -m convert to-flax llama)")
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json / tokenizer_config.json")
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text; repeat the flag to decode several prompts as one batch")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    for text in text_cli.run(args):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
