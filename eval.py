"""Mean response-token loss and perplexity of a model folder over text-only records.

  python eval.py --llm DIR [--tokenizer DIR] --data FILE.jsonl [--data MORE.jsonl]
      [--template NAME] [--seq-len N] [--batch-size B] [--mesh DATA,FSDP,TENSOR]
      [--dtype float32] [--out results.json]

Prints one line per file and the total, and writes everything (with bad-record counts)
to --out. Details: metamorph_jax/evaluation/text_loss.py.
"""
from __future__ import annotations

import argparse
import json
import sys

from metamorph_jax.data.conversation import TEMPLATES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", required=True, help="model folder (converted, or train.py's final/)")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json / tokenizer_config.json "
                                             "(default: the model folder)")
    parser.add_argument("--data", required=True, action="append",
                        help="conversation records (JSONL, JSON, ArrayRecord); repeat for several files")
    parser.add_argument("--template", choices=TEMPLATES,
                        help="chat template (default: the one saved in the model folder)")
    parser.add_argument("--seq-len", type=int, default=2048,
                        help="packed row length; longer records are counted as too_long")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per batch; must divide over the mesh's data x fsdp devices")
    parser.add_argument("--mesh", default="-1,1,1", help="DATA,FSDP,TENSOR sizes (-1: the rest)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        mesh_shape = tuple(int(x) for x in args.mesh.split(","))
        assert len(mesh_shape) == 3
    except (ValueError, AssertionError):
        parser.error(f"--mesh {args.mesh!r}: give three integers DATA,FSDP,TENSOR")

    from metamorph_jax.evaluation.text_loss import evaluate
    results = evaluate(args.llm, args.tokenizer, args.data, template=args.template,
                       seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                       mesh_shape=mesh_shape)
    for path, entry in results["files"].items():
        print(f"{path}: loss {entry['mean_loss']:.6f}  perplexity {entry['perplexity']:.4f}  "
              f"({entry['tokens']} tokens, {entry['records']} records, "
              f"{sum(b['count'] for b in entry['bad_records'].values())} unusable)")
    print(f"mean loss {results['mean_loss']:.6f}  perplexity {results['perplexity']:.4f}  "
          f"({results['tokens']} response tokens)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
