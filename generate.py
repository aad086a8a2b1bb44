"""Text generation from a converted or trained LLM.

  python generate.py --llm MODEL_DIR [--tokenizer DIR] --prompt "..." [--chat]
      [--template NAME] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]

Greedy by default (temperature 0); stops at the model's and tokenizer's end tokens.
--chat renders the prompt with the conversation template saved in the model folder (the
one it was trained with; "llama3" when the folder names none), as train.py and eval.py do.
"""
from __future__ import annotations

import argparse
import sys

from metamorph_jax.data.conversation import TEMPLATES
from metamorph_jax.inference import text_cli
from metamorph_jax.inference.generate import SamplingConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", required=True, help="converted model folder (python -m convert to-flax llama)")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json / tokenizer_config.json "
                                             "(default: the model folder)")
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text; repeat the flag to decode several prompts as one batch")
    parser.add_argument("--chat", action="store_true",
                        help="render the prompt as a user turn with the model's chat template")
    parser.add_argument("--template", choices=TEMPLATES,
                        help="override the model folder's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    for text in text_cli.run(args.llm, args.tokenizer, args.prompt, chat=args.chat,
                             template=args.template, sampling=sampling, dtype=args.dtype):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
