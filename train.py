"""Train the LLM text stage on text-only conversation records.

  python train.py --config configs/text_tiny.py [--config.steps=20 --config.optim.lr=1e-4 ...]

Fields and how to make the tiny inputs: configs/text_tiny.py; what a run does and writes:
metamorph_jax/training/text_loop.py. No mid-run checkpoint/resume yet.
"""
from __future__ import annotations

import sys

from metamorph_jax.training import text_loop


def main(argv=None) -> int:
    from absl import flags
    argv = list(sys.argv if argv is None else argv)
    try:
        config = text_loop.parse_flags(argv)
    except flags.Error as error:
        print(f"{argv[0]}: {error}", file=sys.stderr)
        return 2
    summary = text_loop.train(config)
    if summary["first_loss"] is not None:
        print(f"trained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> "
              f"{summary['last_loss']:.4f}; model folder {summary['final_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
