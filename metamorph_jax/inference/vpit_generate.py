"""Batched KV-cache decoding of the VPiT model: text tokens and generated images.

A row is in text mode or in visual mode. In text mode the LM head samples the next token.
When a row emits `<image_start>` it enters visual mode for exactly V = num_image_tokens
steps: each step's output is the vision head's normalised prediction
z = normalize(head(h)), recorded as a visual token, and the adapter's projection of z is
the next input embedding. The hidden state at `<image_start>` predicts visual token 1 and
the one at visual token V-1 predicts token V, as in training; the hidden state at visual
token V is read by the LM head again, which produces `<image_end>`: forced by default
(`force_image_end=True`), or sampled as the authors' code does. Then text resumes.

Rows of one batch may be in different modes at the same step: mode, visual-step counter,
text and image counts, and the end flag are per-row state, and the next input embedding is
chosen per row with `jnp.where` between the token embedding and the projected visual
token. Decoding runs DECODE_CHUNK steps per dispatch in a `lax.while_loop`; sampling
(greedy, temperature, top-k, top-p, seeded) happens inside the jitted step.

Shapes are static: the batch is padded to a power of two (with `devices`, to that many
devices times a power of two rows each), the prompt width and the number of prompt images
to powers of two, and the cache length is the prompt width plus the
row budget (max_new_tokens + max_new_images * V) rounded up to CACHE_MULTIPLE, so the
prefill and the decoding loop compile once per (batch bucket, length bucket) for a given
sampling rule, never per step or per prompt length.

Devices: by default the batch decodes on the default device. With `devices` (e.g. a
process's `jax.local_devices()`) the parameters are replicated on a one-axis mesh of them
and every per-row array (prompt, visual tokens, KV cache, decoding state) is split over it
by row, so each device decodes its rows; the jitted prefill and loop are the same
functions, partitioned by XLA from the shardings of their inputs. Rows never interact, so
the tokens equal one-device decoding (tests/test_vpit_generate_devices.py). The parameters
are replicated, not sharded: a model too large for one device's memory is not served here.

Where this loop differs from the authors' `greedy_decode` on purpose:
- It is batched, keeps a KV cache (one new position per step instead of re-running the
  whole sequence) and samples (temperature, top-k, top-p) as well as taking the argmax.
- End tokens are checked only on tokens the LM head produced in text mode. The authors'
  loop also argmaxes the LM head at visual positions and stops when that argmax is an end
  token, cutting an image short; here visual steps never end a row.
- `max_new_tokens` counts text tokens only (the markers `<image_start>` / `<image_end>`
  included); images are limited separately by `max_new_images`. The authors' count
  includes the visual steps. A row that has no room left for a whole image (its image
  budget spent, or no text budget for the closing `<image_end>` when it is forced) cannot
  emit `<image_start>`: that logit is masked before sampling, so every image that starts
  is completed.
- `<image_end>` is forced after the V visual steps unless `force_image_end=False`.
With `force_image_end=False`, greedy sampling, one row, and no end token argmaxed at a
visual position, the tokens and visual tokens equal the authors' loop
(tests/test_vpit_generate.py checks this against a full-recomputation loop).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metamorph_jax.data import conversation as conv
from metamorph_jax.data import tasks
from metamorph_jax.inference.generate import sample_tokens
from metamorph_jax.models import layers, llama
from metamorph_jax.models.metamorph import MetaMorph, MetaMorphConfig

# Markers in a Generation's token list.
VISUAL_POSITION = -1   # this position holds a generated visual token
_NO_OUTPUT = -2        # (device side) the row had ended: nothing was produced this step

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclasses.dataclass(frozen=True)
class VPiTSampling:
    """How to decode. max_new_tokens counts text tokens (markers included), not visual
    steps; max_new_images caps the images each row may generate (it sizes the cache)."""
    max_new_tokens: int = 64
    max_new_images: int = 1
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = no top-k cut
    seed: int = 0
    force_image_end: bool = True  # False: the LM head must produce <image_end> itself

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_new_images < 0:
            raise ValueError(f"max_new_images must be >= 0, got {self.max_new_images}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling rule: temperature {self.temperature} (>= 0), "
                             f"top_p {self.top_p} (in (0, 1]), top_k {self.top_k} (>= 0)")


@dataclasses.dataclass(frozen=True)
class VPiTPrompt:
    """One prompt: token ids [L], image_index [L] (n * V + k where position t holds visual
    token k of image n, else -1) and its images, each either SigLIP-normalised pixels
    [H, W, 3] (encoded by the tower) or precomputed visual tokens [V, C]."""
    tokens: np.ndarray
    image_index: np.ndarray
    images: tuple = ()


@dataclasses.dataclass
class Generation:
    """One row's result. tokens: the new positions in order, VISUAL_POSITION (-1) at each
    generated visual token; visual_tokens [images, V, C] (fp32, normalised) the generated
    images in order; finish_reason "stop" (an end token, included in tokens) or "length"."""
    tokens: list
    visual_tokens: np.ndarray
    finish_reason: str

    def text_tokens(self) -> list:
        return [t for t in self.tokens if t != VISUAL_POSITION]


def prompt_from_turns(turns: Sequence[conv.Turn], images: Sequence[np.ndarray], tokenizer,
                      template: str, config: MetaMorphConfig, placeholder_id: int = 0
                      ) -> VPiTPrompt:
    """A generation prompt for a conversation, laid out as training renders it
    (conversation.generation_prompt_pieces): each `<image>` in a turn becomes
    `<image_start>`, V visual positions, `<image_end>`; `images` (pixels or visual
    tokens) fill the slots in order."""
    count = sum(turn.text.count(conv.IMAGE_PLACEHOLDER) for turn in turns)
    if count != len(images):
        raise ValueError(f"the prompt has {count} {conv.IMAGE_PLACEHOLDER} placeholders for "
                         f"{len(images)} images")
    per_image = config.num_image_tokens
    tokens, index = [], []
    for piece in conv.generation_prompt_pieces(turns, template, tokenizer):
        if piece[0] == "text":
            ids = tokenizer(piece[1], add_special_tokens=False)["input_ids"]
            tokens += ids
            index += [-1] * len(ids)
        else:
            number = piece[1]
            tokens += [config.image_start_id] + [placeholder_id] * per_image + [config.image_end_id]
            index += [-1] + [number * per_image + k for k in range(per_image)] + [-1]
    return VPiTPrompt(np.asarray(tokens, np.int32), np.asarray(index, np.int32),
                      tuple(np.asarray(image) for image in images))


def image_prompt(request: str, tokenizer, template: str, config: MetaMorphConfig,
                 placeholder_id: int = 0, images: Sequence[np.ndarray] = (),
                 reply_prefix: str = tasks.TEXT_TO_IMAGE_RESPONSE_PREFIX) -> VPiTPrompt:
    """A prompt whose reply is an image: the user turn `request`, the assistant header, the
    text every text-to-image training record's reply starts with (`reply_prefix`, default
    tasks.TEXT_TO_IMAGE_RESPONSE_PREFIX) and `<image_start>`; the tokens of a rendered
    text-to-image record up to its image, so the generator continues with that image's
    visual tokens as training taught it. An edit or a video record's prompt: `request`
    holds its `<image>` placeholders, `images` fill them (as prompt_from_turns), and
    `reply_prefix` is the record's reply up to its first image ("" for a video record)."""
    prompt = prompt_from_turns([conv.Turn("user", request)], images, tokenizer, template,
                               config, placeholder_id)
    # The reply's text is its own piece in training (conversation.render cuts it at the
    # image), so it is tokenized on its own here too.
    prefix = (tokenizer(reply_prefix, add_special_tokens=False)["input_ids"]
              if reply_prefix else [])
    extra = np.asarray(list(prefix) + [config.image_start_id], np.int32)
    return VPiTPrompt(np.concatenate([prompt.tokens, extra]),
                      np.concatenate([prompt.image_index, np.full(len(extra), -1, np.int32)]),
                      prompt.images)


class _State(NamedTuple):
    """Per-row decoding state (all [B] unless noted), carried through the loop."""
    last_token: jax.Array     # the token input at `index` (when not visual_input)
    last_visual: jax.Array    # [B, C] the visual token input at `index` (when visual_input)
    visual_input: jax.Array   # bool: the input at `index` is the adapter's projection
    index: jax.Array          # the cache position (and position id) of the next input
    visual_mode: jax.Array    # bool: the next output is a visual token
    visual_count: jax.Array   # visual outputs of the current image so far
    pending_end: jax.Array    # bool: the next text output is a forced <image_end>
    text_count: jax.Array     # text tokens produced
    image_count: jax.Array    # images started
    done: jax.Array           # bool


def _pow2(value: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(value) - 1).bit_length())


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


LogitsHook = Callable[[jax.Array, jax.Array], jax.Array]


class VPiTGenerator:
    """Decodes VPiT prompts (text and images in, text and images out) with one model.

    eos_token_ids: tokens that end a row (e.g. `<|eot_id|>`). unroll_layers /
    fuse_projections: as inference.generate.TextGenerator (faster decoding steps; the
    generator keeps the changed copy of the LLM params). logits_hook(logits [B, vocab],
    text_count [B]) -> logits: applied to every text step's logits before sampling, with
    the number of text tokens each row has produced so far (tests use it to make a model
    emit `<image_start>` where they need it; it is a static part of the compiled step).
    devices: decode with the batch split by row over these devices (see the module
    docstring); None: the default device.
    """

    DECODE_CHUNK = 16
    CACHE_MULTIPLE = 64
    MIN_PROMPT_WIDTH = 16

    def __init__(self, model: MetaMorph, params, eos_token_ids: Sequence[int],
                 pad_token_id: int = 0, unroll_layers: bool = True,
                 fuse_projections: bool | None = None, logits_hook: LogitsHook | None = None,
                 devices: Sequence[jax.Device] | None = None):
        config = model.config
        if config.image_start_id is None or config.image_end_id is None:
            raise ValueError("the MetaMorph config has no image_start_id / image_end_id")
        llm_config, llm_params = config.llm, params["llm"]
        if unroll_layers and llm_config.scan_layers:
            llm_params = llama.unstack_layers(llm_params, llm_config.num_layers)
            llm_config = llm_config.replace(scan_layers=False)
        if fuse_projections is None:
            fuse_projections = layers.resolve_platform(llm_config.platform) == "cpu"
        if fuse_projections and not llm_config.fused_projections:
            llm_params = llama.fuse_projections(llm_params)
            llm_config = llm_config.replace(fused_projections=True)
        if llm_config != config.llm:
            model = MetaMorph(config.replace(llm=llm_config))
            params = {**params, "llm": llm_params}
        self.model = model
        self.config = model.config
        self.mesh = None
        if devices is not None:
            devices = list(devices)
            if not devices:
                raise ValueError("devices is empty")
            self.mesh = Mesh(np.asarray(devices), ("rows",))
            params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        self.params = params
        self.eos_token_ids = np.asarray(sorted(set(int(t) for t in eos_token_ids)), np.int32)
        self.pad_token_id = int(pad_token_id)
        self.logits_hook = logits_hook
        self.trace_counts = {"encode": 0, "prefill": 0, "decode": 0}  # for tests

    # --- jitted pieces -------------------------------------------------------------------

    def _apply(self, params, *args, method=None, **kwargs):
        return self.model.apply({"params": params}, *args, method=method, **kwargs)

    @partial(jax.jit, static_argnums=(0,))
    def _encode(self, params, pixels):
        self.trace_counts["encode"] += 1
        return self._apply(params, pixels[None, None], method=MetaMorph.encode_images)[0, 0]

    def _emit(self, params, hidden, state: _State, key, budget, rule):
        """The output read from `hidden` [B, d] (each row's hidden state at the position
        before `state.index`) and the state for the next position. Returns (token [B] with
        VISUAL_POSITION / _NO_OUTPUT markers, visual [B, C], new state)."""
        temperature, top_p, top_k, force_end = rule
        max_tokens, max_images = budget
        cfg = self.config
        start, end = cfg.image_start_id, cfg.image_end_id
        active = ~state.done
        text_out = active & ~state.visual_mode
        visual_out = active & state.visual_mode
        # Each head runs only when some row needs it (at batch 1 a visual step skips the
        # LM head's vocabulary-sized product).
        logits = jax.lax.cond(
            jnp.any(text_out),
            lambda h: self._apply(params, h[:, None], method=MetaMorph.logits)[:, 0],
            lambda h: jnp.zeros((h.shape[0], cfg.llm.vocab_size), jnp.float32), hidden)
        visual = jax.lax.cond(
            jnp.any(visual_out),
            lambda h: self._apply(params, h, method=MetaMorph.vision_head_outputs),
            lambda h: jnp.zeros((h.shape[0], cfg.mm_hidden_size), jnp.float32), hidden)
        if self.logits_hook is not None:
            logits = self.logits_hook(logits, state.text_count)
        # An image starts only if it can be completed: an image left in the budget, and
        # room for <image_start> (and the forced <image_end>) in the text budget.
        closing = 2 if force_end else 1
        can_start = (state.image_count < max_images) & (state.text_count + closing <= max_tokens)
        logits = logits.at[:, start].set(jnp.where(can_start, logits[:, start], -jnp.inf))
        sampled = sample_tokens(logits, key, temperature, top_p, top_k)
        token = jnp.where(state.pending_end, end, sampled)

        starts = text_out & (token == start)
        count = jnp.where(visual_out, state.visual_count + 1, 0)
        image_done = visual_out & (count == cfg.num_image_tokens)
        visual_mode = jnp.where(text_out, starts, state.visual_mode & ~image_done)
        text_count = state.text_count + text_out.astype(jnp.int32)
        eos = jnp.asarray(self.eos_token_ids)
        stopped = text_out & jnp.isin(token, eos)
        out_of_text = (text_count >= max_tokens) & ~visual_mode
        pending = jnp.where(text_out, False, state.pending_end | (image_done & force_end))
        done = state.done | stopped | (out_of_text & ~pending)
        new = _State(
            last_token=jnp.where(text_out, token, state.last_token),
            last_visual=jnp.where(visual_out[:, None], visual, state.last_visual),
            visual_input=jnp.where(active, visual_out, state.visual_input), index=state.index,
            visual_mode=visual_mode, visual_count=count, pending_end=pending,
            text_count=text_count, image_count=state.image_count + starts.astype(jnp.int32),
            done=done)
        marker = jnp.where(visual_out, VISUAL_POSITION, token)
        return jnp.where(active, marker, _NO_OUTPUT), visual, new

    @partial(jax.jit, static_argnums=(0, 9), donate_argnums=(5,))
    def _prefill(self, params, tokens, image_index, visual_tokens, cache, state, key, budget,
                 rule):
        """Causal prefill of the right-padded prompts, then the first output of each row
        from its last prompt position's hidden state."""
        self.trace_counts["prefill"] += 1
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embeds = self._apply(params, tokens, image_index, visual_tokens,
                             method=MetaMorph.embed_inputs)
        out = self._apply(params, inputs_embeds=embeds, positions=positions, cache=cache)
        last = jnp.take_along_axis(out.hidden_states, (state.index - 1)[:, None, None],
                                   axis=1)[:, 0]
        key, sub = jax.random.split(key)
        token, visual, state = self._emit(params, last, state, sub, budget, rule)
        return token, visual, out.cache, state, key

    @partial(jax.jit, static_argnums=(0, 7), donate_argnums=(2,))
    def _decode_chunk(self, params, cache, state, key, num_steps, budget, rule):
        """Up to num_steps (<= DECODE_CHUNK) steps; stops early once every row has ended.
        Returns tokens [B, CHUNK], visual [B, CHUNK, C], the step count and the state."""
        self.trace_counts["decode"] += 1
        batch = state.index.shape[0]
        channels = self.config.mm_hidden_size

        def step(carry):
            i, tokens_out, visual_out, cache, state, key = carry
            token_embeds = self._apply(params, state.last_token,
                                       method=lambda m, t: m.llm.embed(t))
            visual_embeds = self._apply(params, state.last_visual,
                                        method=MetaMorph.project_visual_tokens)
            embeds = jnp.where(state.visual_input[:, None], visual_embeds.astype(
                token_embeds.dtype), token_embeds)
            out = self._apply(params, inputs_embeds=embeds[:, None],
                              positions=state.index[:, None], cache=cache,
                              cache_index=state.index)
            # The next input goes one position further (rows that ended stay put).
            state = state._replace(index=state.index + (~state.done).astype(jnp.int32))
            key, sub = jax.random.split(key)
            token, visual, state = self._emit(params, out.hidden_states[:, 0], state, sub,
                                              budget, rule)
            tokens_out = tokens_out.at[:, i].set(token)
            visual_out = visual_out.at[:, i].set(visual)
            return i + 1, tokens_out, visual_out, out.cache, state, key

        def keep_going(carry):
            return (carry[0] < num_steps) & ~jnp.all(carry[4].done)

        tokens_out = jnp.full((batch, self.DECODE_CHUNK), _NO_OUTPUT, jnp.int32)
        visual_out = jnp.zeros((batch, self.DECODE_CHUNK, channels), jnp.float32)
        count, tokens_out, visual_out, cache, state, key = jax.lax.while_loop(
            keep_going, step, (jnp.int32(0), tokens_out, visual_out, cache, state, key))
        return tokens_out, visual_out, count, cache, state, key

    # --- host side ------------------------------------------------------------------------

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """SigLIP-normalised pixels [H, W, 3] -> the tower's visual tokens [V, C]."""
        return np.asarray(self._encode(self.params, jnp.asarray(pixels, jnp.float32)))

    def _visual_tokens(self, image) -> np.ndarray:
        image = np.asarray(image)
        shape = (self.config.num_image_tokens, self.config.mm_hidden_size)
        if image.ndim == 2:
            if image.shape != shape:
                raise ValueError(f"a prompt's visual tokens have shape {image.shape}, the model "
                                 f"takes {shape}")
            return image.astype(np.float32)
        size = self.config.vision.image_size
        if image.shape != (size, size, 3):
            raise ValueError(f"a prompt image has shape {image.shape}; pass SigLIP-normalised "
                             f"pixels [{size}, {size}, 3] or visual tokens {list(shape)}")
        return self.encode_images(image)

    @property
    def device_count(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def batch_bucket(self, rows: int) -> int:
        """The padded batch for `rows` prompts: a power of two rows per device."""
        return self.device_count * _pow2(-(-rows // self.device_count))

    def _rows(self, tree):
        """Per-row arrays (leading axis = batch) placed split by row over the devices."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec("rows")))

    def _init_cache(self, batch: int, length: int):
        if self.mesh is None:
            return self._apply(self.params, batch, length, method=MetaMorph.init_cache)
        # Zeros made in place on each device (no host copy, no parameters traced in).
        # Scanned layers stack the layer axis in front of the batch axis.
        spec = (PartitionSpec(None, "rows") if self.config.llm.scan_layers
                else PartitionSpec("rows"))
        where = NamedSharding(self.mesh, spec)
        shapes = jax.eval_shape(lambda: self._apply(self.params, batch, length,
                                                    method=MetaMorph.init_cache))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=where), shapes)

    def cache_length(self, prompt_width: int, sampling: VPiTSampling) -> int:
        budget = sampling.max_new_tokens + sampling.max_new_images * self.config.num_image_tokens
        return _round_up(prompt_width + budget, self.CACHE_MULTIPLE)

    def generate(self, prompts: Sequence[VPiTPrompt], sampling: VPiTSampling = VPiTSampling()
                 ) -> list[Generation]:
        """Decode the prompts as one batch; returns each row's Generation."""
        if not prompts:
            raise ValueError("no prompts")
        cfg = self.config
        per_image, channels = cfg.num_image_tokens, cfg.mm_hidden_size
        for number, prompt in enumerate(prompts):
            tokens, index = np.asarray(prompt.tokens), np.asarray(prompt.image_index)
            if tokens.ndim != 1 or len(tokens) == 0 or index.shape != tokens.shape:
                raise ValueError(f"prompt {number}: tokens must be a non-empty [L] array and "
                                 f"image_index the same shape (got {tokens.shape}, {index.shape})")
            if index.max(initial=-1) >= len(prompt.images) * per_image:
                raise ValueError(f"prompt {number}: image_index refers to image "
                                 f"{index.max() // per_image} but the prompt has "
                                 f"{len(prompt.images)} images")
        batch = self.batch_bucket(len(prompts))
        width = _pow2(max(len(p.tokens) for p in prompts), self.MIN_PROMPT_WIDTH)
        slots = _pow2(max(len(p.images) for p in prompts))
        tokens = np.full((batch, width), self.pad_token_id, np.int32)
        image_index = np.full((batch, width), -1, np.int32)
        visual = np.zeros((batch, slots, per_image, channels), np.float32)
        lengths = np.ones(batch, np.int32)   # padding rows: one pad token, ended from the start
        for row, prompt in enumerate(prompts):
            length = len(prompt.tokens)
            tokens[row, :length] = prompt.tokens
            image_index[row, :length] = prompt.image_index
            for n, image in enumerate(prompt.images):
                visual[row, n] = self._visual_tokens(image)
            lengths[row] = length
        # A prompt that ends on <image_start> continues with that image's visual tokens.
        ends_in_image = np.array([row < len(prompts) and prompts[row].tokens[-1] == cfg.image_start_id
                                  for row in range(batch)])
        if ends_in_image.any() and sampling.max_new_images < 1:
            raise ValueError("a prompt ends on <image_start> (its image is generated) but "
                             "max_new_images is 0")
        zeros = np.zeros(batch, np.int32)
        state = self._rows(_State(
            last_token=zeros, last_visual=np.zeros((batch, channels), np.float32),
            visual_input=np.zeros(batch, bool), index=lengths,
            visual_mode=ends_in_image, visual_count=zeros,
            pending_end=np.zeros(batch, bool), text_count=zeros,
            image_count=ends_in_image.astype(np.int32),
            done=np.arange(batch) >= len(prompts)))
        rule = (float(sampling.temperature), float(sampling.top_p), int(sampling.top_k),
                bool(sampling.force_image_end))
        budget = (jnp.int32(sampling.max_new_tokens), jnp.int32(sampling.max_new_images))
        cache = self._init_cache(batch, self.cache_length(width, sampling))
        tokens, image_index, visual = self._rows((tokens, image_index, visual))
        token, vis, cache, state, key = self._prefill(
            self.params, tokens, image_index, visual, cache, state,
            jax.random.key(sampling.seed), budget, rule)
        outputs: list[list[int]] = [[] for _ in prompts]
        images: list[list[np.ndarray]] = [[] for _ in prompts]

        def record(step_tokens: np.ndarray, step_visual: np.ndarray) -> None:
            for row in range(len(prompts)):   # [B, n] and [B, n, C], in order
                for k, value in enumerate(step_tokens[row]):
                    if value == _NO_OUTPUT:
                        continue
                    outputs[row].append(int(value))
                    if value == VISUAL_POSITION:
                        images[row].append(step_visual[row, k])

        record(np.asarray(token)[:, None], np.asarray(vis)[:, None])
        # Every row ends within its budget (text tokens plus whole images), one output of
        # which came from the prefill.
        remaining = sampling.max_new_tokens + sampling.max_new_images * per_image - 1
        while remaining > 0 and not bool(jnp.all(state.done)):
            chunk, chunk_visual, count, cache, state, key = self._decode_chunk(
                self.params, cache, state, key, jnp.int32(min(remaining, self.DECODE_CHUNK)),
                budget, rule)
            count = int(count)
            record(np.asarray(chunk)[:, :count], np.asarray(chunk_visual)[:, :count])
            remaining -= count
        if not bool(jnp.all(state.done)):
            raise RuntimeError("decoding ran past the row budget (a bug in the step rule)")
        results = []
        for row in range(len(prompts)):
            row_tokens = outputs[row]
            flat = (np.stack(images[row]) if images[row]
                    else np.zeros((0, channels), np.float32))
            whole = len(flat) // per_image * per_image
            stop = bool(row_tokens) and row_tokens[-1] in self.eos_token_ids
            results.append(Generation(
                tokens=row_tokens,
                visual_tokens=flat[:whole].reshape(-1, per_image, channels).astype(np.float32),
                finish_reason=FINISH_STOP if stop else FINISH_LENGTH))
        return results



def reply_pieces(generation: Generation, image_start_id: int, image_end_id: int) -> list:
    """A row's new tokens as ("text", [ids]) and ("image", n) pieces in order: each
    generated image's `<image_start>`, visual positions and `<image_end>` become one image
    piece (an `<image_end>` the LM head did not produce is simply absent)."""
    pieces, text, image, i = [], [], 0, 0
    tokens = generation.tokens
    while i < len(tokens):
        if tokens[i] == image_start_id and i + 1 < len(tokens) and tokens[i + 1] == VISUAL_POSITION:
            if text:
                pieces.append(("text", text))
            text = []
            i += 1
            while i < len(tokens) and tokens[i] == VISUAL_POSITION:
                i += 1
            if i < len(tokens) and tokens[i] == image_end_id:
                i += 1
            pieces.append(("image", image))
            image += 1
            continue
        text.append(tokens[i])
        i += 1
    if text:
        pieces.append(("text", text))
    return pieces


def reply_text(generation: Generation, tokenizer, config: MetaMorphConfig,
               image_text: Callable[[int], str] = lambda n: conv.IMAGE_PLACEHOLDER) -> str:
    """The reply as text (special tokens dropped), `image_text(n)` where image n was
    generated: `<image>` by default, which is how the reply re-enters a conversation."""
    out = []
    for kind, value in reply_pieces(generation, config.image_start_id, config.image_end_id):
        out.append(tokenizer.decode(value, skip_special_tokens=True) if kind == "text"
                   else image_text(value))
    return "".join(out)


class ChatSession:
    """A multi-turn conversation with one generator. Each turn is rendered from the whole
    conversation (the template, as training renders it); the images the model generated
    stay in the context: the reply re-enters as text with an `<image>` per generated image,
    and their visual tokens are that turn's images."""

    def __init__(self, generator: VPiTGenerator, tokenizer, template: str,
                 system: str | None = None):
        self.generator = generator
        self.tokenizer = tokenizer
        self.template = template
        self.turns: list[conv.Turn] = [conv.Turn("system", system)] if system else []
        self.images: list[np.ndarray] = []    # every image of the conversation, in order
        self.last_prompt: VPiTPrompt | None = None

    def ask(self, text: str, images: Sequence[np.ndarray] = (),
            sampling: VPiTSampling = VPiTSampling()) -> Generation:
        """One user turn (with one `<image>` per given image, pixels or visual tokens);
        returns the model's reply, which joins the conversation."""
        turns = self.turns + [conv.Turn("user", text)]
        config = self.generator.config
        prompt = prompt_from_turns(turns, self.images + list(images), self.tokenizer,
                                   self.template, config, self.generator.pad_token_id)
        self.last_prompt = prompt
        generation = self.generator.generate([prompt], sampling)[0]
        reply = reply_text(generation, self.tokenizer, config)
        self.turns = turns + [conv.Turn("assistant", reply)]
        self.images = list(prompt.images) + list(generation.visual_tokens)
        return generation
