"""Evaluation of a MetaMorph checkpoint on benchmarks and text-to-image generation, scoring
of existing predictions, and the loss modes.

Benchmarks (greedy answers of the VPiT generator, batched; resumable):

  python eval.py --checkpoint DIR --benchmarks mmbench=MMBench_DEV_EN.tsv,textvqa=TextVQA_VAL.tsv
      [--generation prompts=CAPTIONS.jsonl,references=DIR,inception=pt_inception.pth,clip=DIR]
      [--out DIR] [--batch-size B] [--limit N] [--max-new-tokens N] [--visualizer DIR]
      [--sampler pndm|ddim] [--diffusion-steps N] [--guidance-scale G] [--dtype float32]
      [--local-devices N] [--coordinator HOST:PORT --num-processes N --process-id I]

  DIR is a "metamorph" model folder or a training work directory. OUT gets results.json,
  predictions/<benchmark>.jsonl (id, prompt, raw_answer, extracted, score; a rerun answers
  only the samples not yet there) and, with --generation, generated/<id>.png (one image
  per caption, rendered by the visualiser) scored by FID against the reference folder
  (pytorch-fid's Inception weights file) and CLIP score (a local CLIPModel folder).
  Benchmark names: metamorph_jax/evaluation/benchmarks.py. With neither --benchmarks nor
  --generation, DIR (a work directory) is evaluated on its Shapes world.

  Processes and devices: each process decodes its share of every batch (samples split by
  index; --generation: the captions still to render) with the batch split over its local
  devices (--local-devices N: the first N), and process 0 writes OUT, which must be one
  folder every process sees. A multi-process run is joined with the three flags (or the
  JAX_* variables), or automatically on Cloud TPU and under SLURM
  (metamorph_jax/distributed.py); --data splits its packed batches across processes.

  python eval.py --predictions OUT/predictions --benchmarks NAME=PATH[,...] [--out DIR]
      [--allow-missing]                        (score existing predictions, no model)

Losses (--out is then a JSON file):

  python eval.py --llm DIR [--tokenizer DIR] --data FILE.jsonl [--data MORE.jsonl]
      [--template NAME] [--seq-len N] [--batch-size B] [--mesh DATA,FSDP,TENSOR] [--out F.json]
      (mean response-token loss and perplexity of an LLM folder over text records;
       metamorph_jax/evaluation/text_loss.py)
  python eval.py --checkpoint DIR --data FILE.jsonl [...] [--out F.json]
      (VPiT records: text loss, perplexity and the vision cosine of response images;
       metamorph_jax/evaluation/vpit_loss_eval.py)
"""
from __future__ import annotations

import argparse
import json
import sys

from metamorph_jax import distributed
from metamorph_jax.data.conversation import TEMPLATES
from metamorph_jax.input_errors import ArgumentParser


def main(argv=None) -> int:
    from metamorph_jax import platforms
    platforms.prefer_cpu_without_accelerator()   # before anything imports JAX
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="metamorph model folder or training work directory")
    source.add_argument("--llm", help="LLM model folder (text loss with --data)")
    source.add_argument("--predictions", help="folder of <benchmark>.jsonl to score, no model")
    parser.add_argument("--benchmarks", help="NAME=PATH[,NAME=PATH...]")
    parser.add_argument("--generation", help="prompts=FILE[,references=DIR,inception=FILE][,clip=DIR]")
    parser.add_argument("--out", help="output folder (benchmarks; default eval_out) or JSON "
                                      "file (--data)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N samples / captions of each "
                        "file (MMBench: the first N questions with all their rotations)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length cap")
    parser.add_argument("--allow-missing", action="store_true",
                        help="--predictions: score samples without a prediction as wrong")
    parser.add_argument("--visualizer", help="visualizer folder (default: found from --checkpoint)")
    parser.add_argument("--sampler", choices=["pndm", "ddim"],
                        help="default: pndm (SD 1.5's), ddim for a zero-terminal-SNR visualiser")
    parser.add_argument("--diffusion-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0, help="rendering noise seed")
    parser.add_argument("--data", action="append", help="records for the loss modes (repeatable)")
    parser.add_argument("--tokenizer", help="--llm: tokenizer folder (default: the model folder)")
    parser.add_argument("--template", choices=TEMPLATES, help="--data: chat template override")
    parser.add_argument("--seq-len", type=int, default=2048, help="--data: packed row length")
    parser.add_argument("--mesh", default="-1,1,1", help="--llm: DATA,FSDP,TENSOR sizes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--local-devices", type=int, metavar="N",
                        help="--checkpoint: decode / score over the first N of this "
                             "process's devices (default: all)")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be at least 1")
    if args.local_devices is not None and args.local_devices < 1:
        parser.error("--local-devices must be at least 1")
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedConfigError as error:
        parser.error(str(error))

    if args.data or args.llm:
        return loss_mode(args, parser)
    if args.benchmarks is None and args.predictions:
        parser.error("--predictions needs --benchmarks")
    from metamorph_jax.evaluation import eval_cli
    try:
        files = eval_cli.parse_benchmarks(args.benchmarks) if args.benchmarks else {}
        generation = eval_cli.parse_generation(args.generation) if args.generation else None
    except ValueError as error:
        parser.error(str(error))
    out = args.out or "eval_out"
    import jax
    if args.predictions:
        if generation:
            parser.error("--generation needs --checkpoint")
        if jax.process_index() != 0:   # scoring files needs no model: process 0 alone
            return 0
        from metamorph_jax.evaluation import runner
        summary = runner.evaluate(files, out, predictions_dir=args.predictions,
                                  allow_missing=args.allow_missing, limit=args.limit)
        eval_cli.print_summary(summary)
        return 0
    if not files and not generation:
        if jax.process_count() > 1:
            parser.error("the Shapes-world evaluation (no --benchmarks / --generation) runs "
                         "in one process")
        eval_cli.evaluate_shapes_world(args.checkpoint, out)
        return 0

    from metamorph_jax.inference.render import RenderConfig
    try:
        devices = eval_cli.local_devices(args.local_devices)
    except ValueError as error:
        parser.error(str(error))
    loaded = eval_cli.load(args.checkpoint, render=generation is not None,
                           render_config=RenderConfig(args.sampler, args.diffusion_steps,
                                                      args.guidance_scale, args.seed),
                           visualizer=args.visualizer, dtype=args.dtype, devices=devices)
    summary = {"benchmarks": {}}
    if files:
        summary = eval_cli.answer_benchmarks(loaded, files, out, batch_size=args.batch_size,
                                             limit=args.limit, max_new_tokens=args.max_new_tokens)
    if generation:
        scores = eval_cli.generate_and_score(loaded, generation, out,
                                             batch_size=args.batch_size, limit=args.limit)
        if scores is None:   # processes other than the first: process 0 writes
            summary = None
        else:
            summary["generation"] = scores
            eval_cli.write_results(out, summary)
    if summary is not None:   # None on processes other than the first
        eval_cli.print_summary(summary)
    return 0


def loss_mode(args, parser) -> int:
    import jax

    main = jax.process_index() == 0
    if not args.data:
        parser.error("--llm needs --data")
    if args.benchmarks or args.generation:
        parser.error("--data (a loss) does not combine with --benchmarks / --generation")
    if args.llm:
        try:
            mesh_shape = tuple(int(x) for x in args.mesh.split(","))
            assert len(mesh_shape) == 3
        except (ValueError, AssertionError):
            parser.error(f"--mesh {args.mesh!r}: give three integers DATA,FSDP,TENSOR")
        from metamorph_jax.evaluation.text_loss import evaluate
        results = evaluate(args.llm, args.tokenizer, args.data, template=args.template,
                           seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                           mesh_shape=mesh_shape)
        for path, entry in results["files"].items() if main else ():
            print(f"{path}: loss {entry['mean_loss']:.6f}  perplexity {entry['perplexity']:.4f}  "
                  f"({entry['tokens']} tokens, {entry['records']} records, "
                  f"{sum(b['count'] for b in entry['bad_records'].values())} unusable)")
        if main:
            print(f"mean loss {results['mean_loss']:.6f}  perplexity "
                  f"{results['perplexity']:.4f}  ({results['tokens']} response tokens)")
    else:
        if args.tokenizer:
            parser.error("--tokenizer is for --llm (a checkpoint folder holds its tokenizer)")
        import math

        from metamorph_jax.evaluation import eval_cli
        from metamorph_jax.evaluation.vpit_loss_eval import evaluate
        try:
            # By default as many of the local devices as split the batch evenly.
            devices = eval_cli.local_devices(
                args.local_devices or math.gcd(args.batch_size, jax.local_device_count()))
        except ValueError as error:
            parser.error(str(error))
        results = evaluate(args.checkpoint, args.data, template=args.template,
                           seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                           devices=devices, progress=main)
        for path, entry in [*results["files"].items(), ("total", results)] if main else ():
            cosine = entry["vision_cosine"]
            print(f"{path}: text loss {entry['text_loss']:.6f}  perplexity "
                  f"{entry['perplexity']:.4f}  vision cosine "
                  f"{'-' if cosine is None else f'{cosine:.6f}'}  ({entry['text_tokens']} text, "
                  f"{entry['vision_tokens']} visual tokens, {entry['records']} records, "
                  f"{sum(b['count'] for b in entry['bad_records'].values())} unusable)")
    if args.out and main:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    from metamorph_jax.input_errors import run_command
    sys.exit(run_command(main))
