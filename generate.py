"""Generation with a MetaMorph checkpoint (text and images), or text with a plain LLM.

MetaMorph (prompts are rendered with the model folder's chat template, as in training):

  python generate.py --checkpoint DIR --prompt "..." [--image PATH ...] [--out DIR]
      [--max-new-tokens N] [--max-new-images N] [--temperature T] [--top-p P] [--top-k K]
      [--seed S] [--unforced-image-end] [--visualizer DIR | --no-render]
      [--sampler pndm|ddim] [--diffusion-steps N] [--guidance-scale G]
  python generate.py --checkpoint DIR --prompts FILE.jsonl [--out DIR]   (a batch)
      [--local-devices N] [--coordinator HOST:PORT --num-processes N --process-id I]
  python generate.py --checkpoint DIR --chat [--out DIR]                 (interactive)

--checkpoint is a "metamorph" model folder (the visualiser then comes from --visualizer, a
visualizer folder beside it, or its work directory) or a training work directory (the
latest finished stage exports of both kinds). The text is printed with "[image N: PATH]"
where image N was generated; OUT gets result.json ({"text", "tokens" (the new token ids,
-1 at each generated visual position), "images", "finish_reason"}), image_N.png and
visual_tokens.npy ([images, 64, C]). With --prompts
(lines of {"prompt": "...", "images": [paths]}) each prompt writes OUT/prompt_NNNN/; the
batch is split by row over this process's devices (--local-devices N: the first N), and
over the processes of a multi-process run (prompt k to process k mod P, which alone
writes OUT/prompt_k; OUT must be one folder every process sees). A run is joined with the
three flags (or the JAX_* variables), or automatically on Cloud TPU and under SLURM.
--chat reads turns from stdin ('/image PATH' attaches an image to the next turn, '/quit'
ends); images the model generated stay in the context of later turns. max-new-tokens counts
text tokens; each image adds its 64 visual steps (max-new-images per reply).

Plain LLM (text only):

  python generate.py --llm MODEL_DIR [--tokenizer DIR] --prompt "..." [--chat]
      [--template NAME] [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]

Here --chat renders the prompt as a user turn with the folder's chat template.
Greedy by default (temperature 0); rows stop at the model's and tokenizer's end tokens.
"""
from __future__ import annotations

import argparse
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
    source.add_argument("--llm", help="converted LLM folder (python -m convert to-flax llama)")
    parser.add_argument("--tokenizer", help="--llm only: tokenizer folder (default: the model folder)")
    parser.add_argument("--prompt", action="append",
                        help="prompt text; repeat the flag to decode several prompts as one batch")
    parser.add_argument("--prompts", help="--checkpoint only: JSONL file of prompts, one batch")
    parser.add_argument("--image", action="append", default=[],
                        help="--checkpoint only: a prompt image (repeatable; one <image> each)")
    parser.add_argument("--chat", action="store_true",
                        help="--checkpoint: interactive multi-turn session; --llm: render the "
                             "prompt as a user turn")
    parser.add_argument("--template", choices=TEMPLATES,
                        help="override the model folder's chat template")
    parser.add_argument("--out", default="generated", help="--checkpoint only: output folder")
    parser.add_argument("--visualizer", help="visualizer folder (default: found from --checkpoint)")
    parser.add_argument("--no-render", action="store_true",
                        help="keep generated images as visual tokens only (no visualizer)")
    parser.add_argument("--sampler", choices=["pndm", "ddim"],
                        help="default: pndm (SD 1.5's), ddim for a zero-terminal-SNR visualiser")
    parser.add_argument("--diffusion-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-new-images", type=int, default=1)
    parser.add_argument("--unforced-image-end", action="store_true",
                        help="leave <image_end> after an image to the LM head (the authors' way)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--local-devices", type=int, metavar="N",
                        help="--prompts: split the batch over the first N of this process's "
                             "devices (default: all)")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.local_devices is not None and (args.local_devices < 1 or not args.prompts):
        parser.error("--local-devices takes a count of at least 1, with --prompts")
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedConfigError as error:
        parser.error(str(error))
    import jax
    if jax.process_count() > 1 and not (args.checkpoint and args.prompts):
        parser.error("a multi-process run takes --checkpoint with --prompts (--prompt, "
                     "--chat and --llm run in one process)")

    if args.llm:
        from metamorph_jax.inference import text_cli
        from metamorph_jax.inference.generate import SamplingConfig
        if not args.prompt:
            parser.error("--llm needs --prompt")
        if args.prompts or args.image:
            parser.error("--prompts and --image need --checkpoint")
        sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                  args.top_k)
        for text in text_cli.run(args.llm, args.tokenizer, args.prompt, chat=args.chat,
                                 template=args.template, sampling=sampling, dtype=args.dtype):
            print(text)
        return 0

    from metamorph_jax.inference import vpit_cli
    from metamorph_jax.inference.render import RenderConfig
    from metamorph_jax.inference.vpit_generate import VPiTSampling
    if args.tokenizer:
        parser.error("--tokenizer is for --llm (a checkpoint folder holds its tokenizer)")
    if sum(bool(x) for x in (args.prompt, args.prompts, args.chat)) != 1:
        parser.error("give exactly one of --prompt, --prompts and --chat")
    if args.prompts and args.image:
        parser.error("with --prompts, images are given per line")
    sampling = VPiTSampling(max_new_tokens=args.max_new_tokens,
                            max_new_images=args.max_new_images, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            force_image_end=not args.unforced_image_end)
    devices = None   # --prompt / --chat: one device
    if args.prompts:
        devices = jax.local_devices()
        if args.local_devices is not None:
            if args.local_devices > len(devices):
                parser.error(f"--local-devices {args.local_devices}: this process has "
                             f"{len(devices)} devices")
            devices = devices[:args.local_devices]
    session = vpit_cli.load_session(
        args.checkpoint, args.visualizer, render=not args.no_render,
        render_config=RenderConfig(args.sampler, args.diffusion_steps, args.guidance_scale,
                                   args.seed),
        template=args.template, dtype=args.dtype, devices=devices)
    if args.chat:
        vpit_cli.chat(session, sys.stdin, args.out, sampling, args.image)
        return 0
    if args.prompts:
        specs = vpit_cli.read_prompts_file(args.prompts)
    else:
        specs = [vpit_cli.PromptSpec(text, tuple(args.image)) for text in args.prompt]
    vpit_cli.run_prompts(session, specs, args.out, sampling,
                         process_index=jax.process_index(), process_count=jax.process_count())
    return 0


if __name__ == "__main__":
    from metamorph_jax.input_errors import run_command
    sys.exit(run_command(main))
