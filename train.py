"""Train: run a config's stages in order (VPiT adapter / instruct, decoder, LLM text), then
the config's final evaluation (if it has `final_eval`).

  python train.py                    # configs/shapes.py into runs/shapes
  python train.py --config configs/tiny.py [--workdir DIR] [--config.key=value ...]
  python train.py ... --coordinator HOST:PORT --num-processes N --process-id I   # one per host
  python train.py --config CONFIG --plan v5p-128 [--plan-out plan.json]   # compile only
  python train.py --config CONFIG --dry-run    # the records and steps of each stage; no training

`--plan TOPOLOGY` compiles every stage's train step for a TPU topology on this host (needs
libtpu: pip install -r requirements-tpu.txt) and prints memory per chip against the HBM,
FLOPs, the compiler's estimated step time and MFU; it exits 0 when every stage fits, 3
when one does not, and writes nothing but --plan-out (metamorph_jax/training/plan.py).

Multi-process runs join with metamorph_jax/distributed.py before anything touches a device
(found by JAX on Cloud TPU and SLURM; docs/pods.md is the launch guide); process 0 prints,
writes the metrics; the final evaluation runs in single-process runs only (eval.py
--checkpoint WORK_DIR scores the same).

`--dry-run` prints per stage and source the records that will be read and the steps
(counted where the data is finite: `steps=0` is one pass), reading the record files and
tokenizers but no weights (metamorph_jax/training/epoch_steps.py). A stage whose finite
data ends before its steps stops the run with an error naming the stage, the step and
the sources (exit status 2), unless it sets allow_short=True: then it finishes marked
incomplete (its DONE file, the log, final_metrics.json's "incomplete_stages").

`--config` defaults to configs/shapes.py (the Shapes recipe with its held-out evaluation,
which writes WORK_DIR/final_metrics.json and samples.png), `--workdir` to the config's
work_dir. Re-running the same command with the same work directory resumes from the
latest complete checkpoint (finished stages are skipped; the evaluation runs again).
What a run does and writes: metamorph_jax/training/runner.py; the config schema:
configs/tiny.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "shapes.py"


def with_default_config(argv: list[str]) -> list[str]:
    if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
        return argv
    return [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]


def final_evaluation(config, results) -> dict:
    """evaluation/shapes_eval.py on the finished work directory; prints the numbers."""
    from metamorph_jax.evaluation import shapes_eval
    fields = config.final_eval.to_dict()
    world = fields.pop("world")
    # A stage done by an earlier run: the times that run recorded in its DONE file.
    stage_seconds = {r.name: {"seconds": round(r.seconds, 1), "cpu_seconds": round(r.cpu_seconds, 1),
                              **({} if r.ran else {"earlier_run": True})}
                     for r in results if r.ran or r.cpu_seconds}
    incomplete = {r.name: {"steps": r.steps, "planned_steps": r.planned_steps}
                  for r in results if not r.complete}
    metrics = shapes_eval.evaluate_shapes(
        config.work_dir, world, shapes_eval.ShapesEvalConfig.from_config(fields),
        stage_seconds=stage_seconds, incomplete_stages=incomplete)
    for name in ("vqa_accuracy", "visual_token_cosine", "generation_oracle_accuracy"):
        chance = metrics[shapes_eval.CHANCE_FIELDS[name]]
        print(f"{name}: {metrics[name]:.3f} (chance {chance:.3f})")
    for line in shapes_eval.summary_lines(metrics):
        print(line)
    print(f"seconds: {json.dumps(metrics['stage_seconds'])}; evaluation "
          f"{json.dumps({k: round(v, 1) for k, v in metrics['eval_seconds'].items()})}")
    for name, counts in metrics["incomplete_stages"].items():
        print(f"stage {name} is INCOMPLETE: {counts['steps']} of {counts['planned_steps']} steps")
    print(f"wrote {Path(config.work_dir) / 'final_metrics.json'} and {metrics['samples']}")
    return metrics


def _plan_requested(argv: list[str]) -> bool:
    return any(arg == "--plan" or arg.startswith("--plan=") for arg in argv[1:])


def main(argv=None) -> int:
    import os
    argv = list(sys.argv if argv is None else argv)
    if _plan_requested(argv):
        # Compiling for a topology needs no accelerator here: libtpu without a TPU would
        # make JAX try (and fail, noisily) to start the TPU backend first.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from metamorph_jax import platforms
    platforms.prefer_cpu_without_accelerator()   # before anything imports JAX
    from metamorph_jax import distributed
    from metamorph_jax.training import runner
    # Bad flags, configs and files raise input errors (metamorph_jax/input_errors.py):
    # run_command prints them as one line and exits 2.
    argv = with_default_config(argv)
    config, options = runner.parse_command(argv)
    if options["dry-run"].value:
        from metamorph_jax.training import epoch_steps
        return epoch_steps.dry_run(config)
    if options.plan:
        from metamorph_jax.training import plan
        return plan.plan(config, options.plan, options["plan-out"].value)
    distributed.initialize(**distributed.from_flags(options))
    results = runner.run(config)
    import jax
    several = jax.process_count() > 1
    if jax.process_index() != 0:   # process 0 reports
        return 0
    for result in results:
        short = ("" if result.complete else
                 f" INCOMPLETE: the data ran out after {result.steps} of "
                 f"{result.planned_steps} steps (allow_short);")
        if not result.ran:
            print(f"stage {result.name}: already done ({result.final_dir}){short}")
            continue
        resumed = ("" if result.resumed_from is None
                   else f" resumed at step {result.resumed_from},")
        losses = (f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
                  if result.losses else "")
        print(f"stage {result.name}:{resumed}{short} {result.steps} steps{losses}, "
              f"{result.seconds:.0f} s; model folder {result.final_dir}")
    if config.get("final_eval") and several:
        # Process 0 alone would outlive its peers' shutdown wait; eval.py scores the same.
        print(f"final evaluation: not run in a multi-process run; score the result with "
              f"python eval.py --checkpoint {config.work_dir}")
    elif config.get("final_eval"):
        final_evaluation(config, results)
    return 0


if __name__ == "__main__":
    from metamorph_jax.input_errors import run_command
    sys.exit(run_command(main))
