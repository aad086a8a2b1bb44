"""Score existing predictions without a model.

  python -m metamorph_jax.evaluation.score_cli --bench mmbench=MMBench_DEV_EN.tsv
      [--bench textvqa=TextVQA_VAL.tsv ...] --predictions OUT/predictions --out RESULTS_DIR
      [--allow-missing]

Reads each benchmark file, re-extracts and re-scores every raw answer of
PREDICTIONS/<benchmark>.jsonl, prints the scores (per category where the benchmark has
them) and their average, and writes RESULTS_DIR/results.json. Benchmark names:
metamorph_jax/evaluation/benchmarks.py.
"""
from __future__ import annotations

import argparse
import sys

from metamorph_jax.evaluation import benchmarks, results, runner
from metamorph_jax.input_errors import ArgumentParser, run_command


def parse_benches(values: list[str], parser) -> dict:
    files = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            parser.error(f"--bench {value!r}: give NAME=FILE")
        if name not in benchmarks.NAMES:
            parser.error(f"--bench {value!r}: unknown benchmark {name!r}; choose from {benchmarks.NAMES}")
        if name in files:
            parser.error(f"--bench {name} given twice")
        files[name] = path
    return files


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="append", required=True, help="NAME=FILE (repeat)")
    parser.add_argument("--predictions", required=True, help="folder of <benchmark>.jsonl files")
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score samples without a prediction as wrong (counted) instead of failing")
    args = parser.parse_args(argv)
    summary = runner.evaluate(parse_benches(args.bench, parser), args.out,
                              predictions_dir=args.predictions, allow_missing=args.allow_missing)
    for line in results.summary_lines(summary):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
