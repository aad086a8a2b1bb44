"""VPiT decoding speed: our batched KV-cache decoder against full recomputation (the authors'
`greedy_decode` algorithm) over the same random MetaMorph, and seconds per generated image
end to end (LLM + visualiser).

  python -m benchmarks.generate_vpit [--hidden 128] [--layers 4] [--new-tokens 256]
      [--prompt-len 32] [--diffusion-steps 50]

Rows: tokens/s at batch 1 and 8 for `--new-tokens` new positions (greedy), one generated
image among them (64 visual steps, started by a logits hook at text step 8, <image_end>
forced), prefill included. The recomputation re-runs the whole sequence every step and
reads its last position, as the authors' loop does; ours keeps the cache. The authors'
loop is batch 1; at batch 8 the recomputation runs the 8 rows together (more generous to
it than 8 batch-1 runs). Its sequence lives in buffers of widths rounded up to 64 (one
compile per width, all compiled before timing), so each step costs a forward over at most
63 positions more than the sequence. Both sides exclude compilation (a warm-up run first).
The image row: one prompt -> one image (<image_start>, 64 visual steps, <image_end>), then
the pixel-space visualiser (PNDM, guidance 7.5) renders it; seconds for each part.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.inference import vpit_generate as vg
from metamorph_jax.inference.render import ImageRenderer, RenderConfig
from metamorph_jax.models import metamorph
from metamorph_jax.models.llama import LlamaConfig
from metamorph_jax.models.noise_schedule import NoiseSchedule
from metamorph_jax.models.siglip import SiglipConfig
from metamorph_jax.models.visualizer import Visualizer, VisualizerConfig

VOCAB, IMAGE_AT = 2048, 8


def build(hidden: int, layers: int):
    llm = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_layers=layers, num_heads=hidden // 32, num_kv_heads=max(1, hidden // 64),
                      head_dim=32, rope_theta=10000.0, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_ids=(2,), pad_token_id=None)
    vision = SiglipConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, image_size=32, patch_size=4, use_head=False,
                          num_visual_tokens=64)
    config = metamorph.MetaMorphConfig(llm=llm, vision=vision, num_image_tokens=64,
                                       image_start_id=VOCAB - 2, image_end_id=VOCAB - 1)
    params = nn.unbox(metamorph.init_params(config, jax.random.key(0)))
    return config, params


def image_hook(config):
    def hook(logits, text_count):
        return logits.at[:, config.image_start_id].add(jnp.where(text_count == IMAGE_AT, 1e4, 0.0))
    return hook


def recompute_decode(model, params, prompt: np.ndarray, new_positions: int, hook):
    """The authors' algorithm over `prompt` [B, L] (rows in lockstep): every step runs the
    whole sequence, argmax (with the same hook) or, for 64 steps after <image_start>,
    normalize(head(h_last)) through the adapter as the next input."""
    M = metamorph.MetaMorph
    config = model.config
    batch, length = prompt.shape
    widths = sorted({-(-n // 64) * 64 for n in range(length, length + new_positions + 1)})

    @jax.jit
    def step(p, embeds, last):
        h = model.apply({"params": p}, inputs_embeds=embeds,
                        positions=jnp.broadcast_to(jnp.arange(embeds.shape[1]),
                                                   embeds.shape[:2])).hidden_states[:, last]
        logits = model.apply({"params": p}, h[:, None], method=M.logits)[:, 0]
        z = model.apply({"params": p}, h, method=M.vision_head_outputs)
        return logits, z, model.apply({"params": p}, z, method=M.project_visual_tokens)

    embed = jax.jit(lambda p, t: model.apply({"params": p}, t, method=lambda m, x: m.llm.embed(x)))

    def run():
        sequence = np.asarray(embed(params, jnp.asarray(prompt)))
        image_mode, count, text_count = False, 0, 0
        for _ in range(new_positions):
            n = sequence.shape[1]
            width = next(w for w in widths if w >= n)
            buffer = np.zeros((batch, width, sequence.shape[2]), np.float32)
            buffer[:, :n] = sequence
            logits, _, projected = step(params, jnp.asarray(buffer), n - 1)
            if image_mode:
                new = np.asarray(projected)
                count += 1
                image_mode = count < config.num_image_tokens
            else:
                logits = hook(logits, jnp.full((batch,), text_count, jnp.int32))
                token = np.asarray(jnp.argmax(logits, axis=-1))
                text_count += 1
                new = np.asarray(embed(params, jnp.asarray(token)))
                if token[0] == config.image_start_id:
                    image_mode, count = True, 0
            sequence = np.concatenate([sequence, new[:, None]], axis=1)
        return sequence

    return run


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--diffusion-steps", type=int, default=50)
    args = parser.parse_args(argv)

    config, params = build(args.hidden, args.layers)
    model = metamorph.MetaMorph(config)
    hook = image_hook(config)
    generator = vg.VPiTGenerator(model, params, [], logits_hook=hook)
    sampling = vg.VPiTSampling(max_new_tokens=args.new_tokens - config.num_image_tokens,
                               max_new_images=1)
    rng = np.random.default_rng(0)
    print(f"MetaMorph LLM d={args.hidden}, {args.layers} layers, vocab {VOCAB}; "
          f"{args.prompt_len}-token prompt, {args.new_tokens} new positions including one "
          f"64-token image; {jax.devices()[0].platform}", flush=True)
    print(f"{'batch':>5} {'ours tok/s':>11} {'recompute tok/s':>16} {'ratio':>7}", flush=True)
    for batch in (1, 8):
        prompt = rng.integers(3, VOCAB - 2, (batch, args.prompt_len)).astype(np.int32)
        prompts = [vg.VPiTPrompt(row, np.full(len(row), -1, np.int32)) for row in prompt]

        def ours():
            out = generator.generate(prompts, sampling)
            assert all(len(g.tokens) == args.new_tokens for g in out), [len(g.tokens) for g in out]
            assert all(len(g.visual_tokens) == 1 for g in out)
        ours()
        ours_s = timed(ours)
        reference = recompute_decode(model, params, prompt, args.new_tokens, hook)
        reference()
        reference_s = timed(reference)
        tokens = batch * args.new_tokens
        print(f"{batch:>5} {tokens / ours_s:>11.1f} {tokens / reference_s:>16.1f} "
              f"{reference_s / ours_s:>6.1f}x", flush=True)

    # One image end to end: the LLM's image (prompt -> <image_start>, 64 steps, <image_end>)
    # and the visualiser's rendering.
    vis_config = VisualizerConfig.from_dict(dict(
        token_dim=config.mm_hidden_size, projector_hidden=64, num_tokens=64, context_length=77,
        image_size=32, vae=None,
        unet=dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                  layers_per_block=1, attention_head_dim=8, cross_attention_dim=64,
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))))
    visualizer = Visualizer(vis_config)
    vis_params = nn.unbox(visualizer.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)),
                                          jnp.zeros((1,), jnp.int32),
                                          jnp.zeros((1, 64, config.mm_hidden_size))))["params"]
    renderer = ImageRenderer(visualizer, vis_params, NoiseSchedule(),
                             RenderConfig("pndm", args.diffusion_steps, 7.5))
    first = vg.VPiTGenerator(model, params, [],
                             logits_hook=lambda logits, n: logits.at[:, config.image_start_id].add(
                                 jnp.where(n == 0, 1e4, 0.0)))
    prompt = [vg.VPiTPrompt(rng.integers(3, VOCAB - 2, args.prompt_len).astype(np.int32),
                            np.full(args.prompt_len, -1, np.int32))]
    one_image = vg.VPiTSampling(max_new_tokens=2, max_new_images=1)
    visual = first.generate(prompt, one_image)[0].visual_tokens
    renderer.render(visual)
    llm_s = timed(lambda: first.generate(prompt, one_image))
    render_s = timed(lambda: renderer.render(visual))
    print(f"one image end to end: {llm_s + render_s:.2f} s (LLM {llm_s:.2f} s for 66 positions, "
          f"visualiser {render_s:.2f} s: pixel-space 32x32 UNet, PNDM {args.diffusion_steps} "
          f"steps, guidance 7.5)", flush=True)


if __name__ == "__main__":
    main()
