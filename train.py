"""Train: run a config's stages in order (VPiT adapter / instruct, decoder, LLM text).

  python train.py --config configs/tiny.py [--workdir DIR] [--config.key=value ...]

`--workdir` defaults to the config's work_dir. Re-running the same command with the same
work directory resumes from the latest complete checkpoint (finished stages are skipped).
What a run does and writes: metamorph_jax/training/runner.py; the config schema:
configs/tiny.py.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from absl import flags

    from metamorph_jax.training import runner
    from metamorph_jax.training.objectives import StageConfigError
    argv = list(sys.argv if argv is None else argv)
    try:
        config = runner.parse_flags(argv)
        results = runner.run(config)
    except (flags.Error, StageConfigError) as error:
        print(f"{argv[0]}: {error}", file=sys.stderr)
        return 2
    for result in results:
        if not result.ran:
            print(f"stage {result.name}: already done ({result.final_dir})")
            continue
        resumed = ("" if result.resumed_from is None
                   else f" resumed at step {result.resumed_from},")
        losses = (f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
                  if result.losses else "")
        print(f"stage {result.name}:{resumed} {result.steps} steps{losses}; model folder "
              f"{result.final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
