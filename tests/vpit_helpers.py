"""A tiny random MetaMorph with the tiny word-level tokenizer, and the authors' decoding
loop written over our model (batch 1, the whole sequence re-run every step, argmax), for
the decoding tests."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.data import conversation as conv
from metamorph_jax.data.testing import build_tiny_tokenizer
from metamorph_jax.models import metamorph
from metamorph_jax.models.llama import LlamaConfig
from metamorph_jax.models.siglip import SiglipConfig

IMAGE_SIZE, TOKENS_PER_IMAGE, VISION_WIDTH = 16, 4, 24


def tiny_vpit(seed: int = 0, scale: float = 3.0):
    """(tokenizer, config, params): a 2-layer LLaMA, a 2-layer SigLIP tower with a 4x4
    patch grid reduced to 2x2 = 4 visual tokens. The LLM's weights are scaled up so that
    greedy continuations vary and argmax margins stay far above fp32 noise."""
    tokenizer, config = tiny_vpit_config()
    params = nn.unbox(metamorph.init_params(config, jax.random.key(seed)))
    params["llm"] = jax.tree.map(lambda p: p * scale, params["llm"])
    return tokenizer, config, params


def tiny_vpit_config():
    """(tokenizer, config) of tiny_vpit."""
    tokenizer = build_tiny_tokenizer()
    ids = conv.add_image_tokens(tokenizer)
    llm = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      rope_theta=10000.0, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id,
                      eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=None)
    vision = SiglipConfig(hidden_size=VISION_WIDTH, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=4,
                          use_head=False, num_visual_tokens=TOKENS_PER_IMAGE)
    config = metamorph.MetaMorphConfig(llm=llm, vision=vision, num_image_tokens=TOKENS_PER_IMAGE,
                                       image_start_id=ids.image_start_id,
                                       image_end_id=ids.image_end_id)
    return tokenizer, config


def force_image_start_at(config, text_steps) -> callable:
    """A logits hook that makes every row emit <image_start> as its text token number
    `text_steps[i]` (counting from 0): +1e4 on that logit there."""
    steps = jnp.asarray(list(text_steps), jnp.int32)

    def hook(logits, text_count):
        bonus = jnp.where(jnp.isin(text_count, steps), 1e4, 0.0)
        return logits.at[:, config.image_start_id].add(bonus)
    return hook


def authors_greedy_decode(model, params, tokens, image_index, visual_tokens, *,
                          max_text_tokens: int, eos_ids, hook=None, width: int = 256):
    """The authors' greedy_decode over our model: batch 1, no KV cache (every step runs the
    whole sequence), argmax; in image mode z = normalize(head(h_last)) is recorded and
    projector(z) appended as the next input embedding, for V steps; `<image_end>` is left to
    the LM head. Two of their choices are not ours and are reported, not copied: the loop
    stops after `max_text_tokens` text tokens (theirs counts visual steps too), and
    `eos_at_visual` says whether an end token was argmaxed at a visual position (where
    their loop would have stopped).

    The sequence lives in a fixed-width buffer so the forward compiles once: causal
    attention keeps the zero rows after the current position from changing it.
    Returns (tokens with -1 at visual positions, visual tokens [n, C], eos_at_visual).
    """
    M = metamorph.MetaMorph
    config = model.config

    @jax.jit
    def last_hidden(p, embeds, length):
        out = model.apply({"params": p}, inputs_embeds=embeds,
                          positions=jnp.arange(width)[None])
        return out.hidden_states[0, length - 1]

    def apply(method, *args):
        return model.apply({"params": params}, *args, method=method)

    prompt = apply(M.embed_inputs, jnp.asarray(tokens)[None], jnp.asarray(image_index)[None],
                   jnp.asarray(visual_tokens)[None])[0]
    sequence = [row for row in prompt]
    out, visual, eos_at_visual = [], [], False
    image_mode, count, text_count = False, 0, 0
    while text_count < max_text_tokens:
        embeds = jnp.zeros((1, width, config.llm.hidden_size)).at[0, :len(sequence)].set(
            jnp.stack(sequence))
        h = last_hidden(params, embeds, len(sequence))
        logits = apply(M.logits, h[None, None])[0]
        if hook is not None:
            logits = hook(logits, jnp.asarray([text_count], jnp.int32))
        argmax = int(jnp.argmax(logits[0]))
        if image_mode:
            z = apply(M.vision_head_outputs, h[None])[0]
            visual.append(np.asarray(z))
            sequence.append(apply(M.project_visual_tokens, z[None])[0])
            out.append(-1)
            eos_at_visual |= argmax in eos_ids
            count += 1
            image_mode = count < config.num_image_tokens
            continue
        out.append(argmax)
        text_count += 1
        sequence.append(apply(lambda m, t: m.llm.embed(t), jnp.asarray([argmax]))[0])
        if argmax == config.image_start_id:
            image_mode, count = True, 0
        if argmax in eos_ids:
            break
    return out, np.asarray(visual).reshape(-1, config.mm_hidden_size), eos_at_visual


def prefer_image_start(params, config, strength: float = 10.0):
    """Params whose LM head prefers `<image_start>` at every text step: hidden dimension 0
    carries a constant `strength` (every token embedding and every adapter output has it,
    and the small random layers barely move it), and only `<image_start>`'s LM-head
    column reads that dimension strongly. For end-to-end tests without a logits hook."""
    params = jax.tree.map(lambda x: x, params)
    llm = params["llm"]
    llm["embed_tokens"]["embedding"] = llm["embed_tokens"]["embedding"].at[:, 0].set(strength)
    adapter = params["mm_projector"]["linear_2"]
    adapter["kernel"] = adapter["kernel"].at[:, 0].set(0.0)
    adapter["bias"] = adapter["bias"].at[0].set(strength)
    llm["lm_head"]["kernel"] = llm["lm_head"]["kernel"].at[0, config.image_start_id].set(strength)
    return params


def tiny_visualizer_fields(image_size: int = 8) -> dict:
    """A pixel-space visualiser config (VisualizerConfig.from_dict fields) for tiny_vpit's
    visual tokens: one cross-attention level, 8x8 RGB."""
    return dict(token_dim=VISION_WIDTH, projector_hidden=16, num_tokens=TOKENS_PER_IMAGE,
                context_length=6, image_size=image_size,
                unet=dict(sample_size=image_size, in_channels=3, out_channels=3,
                          block_out_channels=(16,), layers_per_block=1, attention_head_dim=4,
                          cross_attention_dim=16, norm_num_groups=8,
                          down_block_types=("CrossAttnDownBlock2D",),
                          up_block_types=("CrossAttnUpBlock2D",)),
                vae=None)


NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
             beta_schedule="scaled_linear", prediction_type="epsilon", set_alpha_to_one=False,
             steps_offset=1, timestep_spacing="leading")


def save_tiny_folders(root, *, seed: int = 0):
    """A "metamorph" model folder (tiny_vpit with prefer_image_start, its tokenizer) and a
    pixel-space "visualizer" folder as the stage runner exports them. Returns their paths."""
    from pathlib import Path

    from metamorph_jax import pretrained
    from metamorph_jax.models.visualizer import Visualizer, VisualizerConfig

    root = Path(root)
    tokenizer, config, params = tiny_vpit(seed, scale=1.0)
    params = prefer_image_start(params, config)
    model_dir, vis_dir = root / "metamorph", root / "visualizer"
    pretrained.save_pretrained(model_dir, "metamorph", config.to_dict(),
                               jax.tree.map(np.asarray, params), chat_template="llama3")
    tokenizer.save_pretrained(str(model_dir))
    fields = tiny_visualizer_fields()
    vis_config = VisualizerConfig.from_dict(fields)
    size = vis_config.image_size
    # Jitted with an RBG key (as objectives.py inits the decoder): the UNet's init takes
    # several times less than eager threefry; any random params serve these tests.
    vis_params = nn.unbox(jax.jit(lambda rng: Visualizer(vis_config).init(
        rng, jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, TOKENS_PER_IMAGE, VISION_WIDTH))))(
            jax.random.key(seed + 1, impl="unsafe_rbg")))["params"]
    pretrained.save_pretrained(vis_dir, "visualizer",
                               {"model": fields, "noise": NOISE, "vision_dir": ""},
                               jax.tree.map(np.asarray, vis_params))
    return model_dir, vis_dir
