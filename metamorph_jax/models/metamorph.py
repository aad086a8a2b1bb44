"""The VPiT model of MetaMorph: SigLIP tower -> adapter -> LLaMA -> LM head + vision head.

REFERENCE.md, "Model": images become 64 L2-normalised SigLIP tokens (the frozen tower's
`visual_tokens`), the adapter ("mlp2x_gelu": Linear(C_vis -> d), exact GELU, Linear(d -> d))
maps each to an LLM input embedding at the image's visual positions, and the vision head
("mlp": Linear(d -> d), exact GELU, Linear(d -> C_vis), L2-normalised) reads the LLM's
final hidden states to predict the next visual token.

Parameter tree (a checkpoint contract; convert/metamorph.py maps it to the authors' names):

    vision_tower/...                 SiglipVisionModel (frozen; gradients stop at its output)
    mm_projector/linear_0/{kernel [C_vis, d], bias [d]}
    mm_projector/linear_2/{kernel [d, d], bias [d]}
    llm/...                          LlamaForCausalLM (a converted LLaMA folder's params)
    vision_head/linear_0/{kernel [d, d], bias [d]}
    vision_head/linear_2/{kernel [d, C_vis], bias [C_vis]}

The pieces are methods so that training and decoding can use them apart: `encode_images`,
`embed_inputs`, `__call__` (which also passes a KV cache through), `vision_head_outputs`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from metamorph_jax.input_errors import BadInput
from metamorph_jax.models import layers
from metamorph_jax.models import token_rows
from metamorph_jax.models import visual_tokens as vt
from metamorph_jax.models.llama import DecoderOutput, LlamaConfig, LlamaForCausalLM
from metamorph_jax.models.siglip import SiglipConfig, SiglipVisionModel

Array = jax.Array

PROJECTOR_TYPES = ("mlp2x_gelu",)
VISION_HEAD_TYPES = ("mlp",)
NUM_NEW_TOKENS = 2  # <image_start>, <image_end>


# Names in mm_vision_tower that mean SigLIP So400m/14@384 (SiglipConfig's defaults).
SO400M_NAMES = ("siglip-so400m-patch14-384", "CLIP-ViT-SO400M-14-384", "ViT-SO400M-14-SigLIP-384")
# (field, allowed values, default when absent or None for a required field)
_FIXED_FIELDS = (
    ("mm_vision_select_feature", ("patch", "cls_patch"), "patch"),  # the same for SigLIP
    ("mm_patch_merge_type", ("flat",), "flat"),
    ("mm_use_im_start_end", (True,), True),
    ("image_token_reduction", ("interpolation",), None),
    ("apply_softmax", (False,), False),
)


def _hf_vision_config(hf: dict, vision: SiglipConfig | None) -> SiglipConfig:
    """The tower's config for an authors' config.json, which does not describe it: `vision`
    when given, else a `vision_config` field (which to_hf writes), else So400m/14@384 when
    `mm_vision_tower` names it (what the authors' code loads whatever the name)."""
    if vision is not None:
        return vision
    if isinstance(hf.get("vision_config"), dict):
        return SiglipConfig.from_hf(hf["vision_config"])
    name = str(hf.get("mm_vision_tower", ""))
    if any(known in name for known in SO400M_NAMES):
        return SiglipConfig()
    raise BadInput(f"field 'mm_vision_tower' = {hf.get('mm_vision_tower')!r} is not SigLIP "
                   f"So400m/14@384 and there is no 'vision_config': pass --vision-tower "
                   f"SIGLIP_DIR (a Hugging Face SigLIP folder) to give the tower's config")


@dataclasses.dataclass(frozen=True)
class MetaMorphConfig:
    """The LLM and vision tower configs plus the authors' config.json fields for the rest.

    mm_hidden_size defaults to the tower's width and must equal it; num_image_tokens and
    normalize_vision must agree with the tower's num_visual_tokens and
    normalize_visual_tokens (the authors' one switch normalises both the SigLIP tokens
    and the head's output). image_start_id / image_end_id are the two vocabulary rows the
    image markers use (LLaMA-3: 128256, 128257).
    """
    llm: LlamaConfig
    vision: SiglipConfig
    mm_projector_type: str = "mlp2x_gelu"
    vision_head_type: str = "mlp"
    num_image_tokens: int = 64
    normalize_vision: bool = True
    vision_coef: float = 1.0
    mm_hidden_size: int | None = None
    image_start_id: int | None = None
    image_end_id: int | None = None

    def __post_init__(self):
        if self.mm_hidden_size is None:
            object.__setattr__(self, "mm_hidden_size", self.vision.hidden_size)
        if self.mm_projector_type not in PROJECTOR_TYPES:
            raise BadInput(f"field 'mm_projector_type' = {self.mm_projector_type!r} is not "
                           f"supported (supported: {PROJECTOR_TYPES})")
        if self.vision_head_type not in VISION_HEAD_TYPES:
            raise BadInput(f"field 'vision_head_type' = {self.vision_head_type!r} is not "
                           f"supported (supported: {VISION_HEAD_TYPES})")
        if self.mm_hidden_size != self.vision.hidden_size:
            raise BadInput(f"field 'mm_hidden_size' = {self.mm_hidden_size} differs from the "
                           f"vision tower's hidden_size {self.vision.hidden_size}")
        if self.num_image_tokens != self.vision.num_visual_tokens:
            raise BadInput(f"field 'num_image_tokens' = {self.num_image_tokens} differs from "
                           f"the vision config's num_visual_tokens "
                           f"{self.vision.num_visual_tokens}")
        if not self.normalize_vision:
            raise BadInput("field 'normalize_vision' = False is not supported (the authors' "
                           "unnormalised variant trains an L1 loss, which is not implemented)")
        if self.vision.normalize_visual_tokens != self.normalize_vision:
            raise BadInput(f"field 'normalize_vision' = {self.normalize_vision} but the vision "
                           f"config's normalize_visual_tokens is "
                           f"{self.vision.normalize_visual_tokens}")
        for name in ("image_start_id", "image_end_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.llm.vocab_size:
                raise BadInput(f"field {name!r} = {value} is outside the LLM vocabulary "
                               f"(vocab_size {self.llm.vocab_size})")

    @classmethod
    def from_hf(cls, hf: dict, vision: SiglipConfig | None = None) -> "MetaMorphConfig":
        """From the authors' config.json dict (a LlamaConfig with model_type "metamorph_llama"
        and the mm_* fields); `vision` overrides the tower's config (see _hf_vision_config)."""
        if hf.get("model_type") != "metamorph_llama":
            raise BadInput(f"field 'model_type' is {hf.get('model_type')!r}, not 'metamorph_llama'")
        llm = LlamaConfig.from_hf({**hf, "model_type": "llama"})
        for field in ("mm_hidden_size", "mm_projector_type", "vision_head_type", "num_image_tokens",
                      "mm_vision_select_layer"):
            if field not in hf:
                raise BadInput(f"missing field {field!r}")
        for field, allowed, default in _FIXED_FIELDS:
            if default is None and field not in hf:
                raise BadInput(f"missing field {field!r}")
            value = hf.get(field, default)
            if value not in allowed:
                raise BadInput(f"field {field!r} = {value!r} is not supported (supported: "
                               f"{list(allowed)})")
        vision = _hf_vision_config(hf, vision).replace(
            visual_token_layer=hf["mm_vision_select_layer"],
            num_visual_tokens=hf["num_image_tokens"],
            normalize_visual_tokens=bool(hf.get("normalize_vision", False)))
        # The image markers are the last two rows unless the file says otherwise (LLaMA-3's
        # tokenizer has exactly 128256 tokens, so they land at 128256 and 128257).
        return cls(
            llm=llm, vision=vision, mm_projector_type=hf["mm_projector_type"],
            vision_head_type=hf["vision_head_type"], num_image_tokens=hf["num_image_tokens"],
            normalize_vision=bool(hf.get("normalize_vision", False)),
            vision_coef=float(hf.get("vision_coef", 1.0)), mm_hidden_size=hf["mm_hidden_size"],
            image_start_id=hf.get("image_start_id", llm.vocab_size - 2),
            image_end_id=hf.get("image_end_id", llm.vocab_size - 1))

    def to_hf(self) -> dict:
        """A config.json the authors' code reads (and transformers' LlamaForCausalLM loads)."""
        out = self.llm.to_hf()
        out.update({
            "architectures": ["MetaMorphLlamaForCausalLM"], "model_type": "metamorph_llama",
            "mm_hidden_size": self.mm_hidden_size, "mm_projector_type": self.mm_projector_type,
            "mm_vision_select_layer": self.vision.visual_token_layer,
            "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
            "mm_use_im_start_end": True, "vision_head_type": self.vision_head_type,
            "image_token_reduction": "interpolation", "num_image_tokens": self.num_image_tokens,
            "freeze_vision": True, "normalize_vision": self.normalize_vision, "apply_softmax": False,
            "vision_coef": self.vision_coef, "image_start_id": self.image_start_id,
            "image_end_id": self.image_end_id,
            # Not the authors' field: the tower's architecture, so to-flax reads it back.
            "vision_config": self.vision.to_hf(),
        })
        return out

    def replace(self, **changes) -> "MetaMorphConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["llm"] = self.llm.to_dict()
        out["vision"] = self.vision.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MetaMorphConfig":
        data = dict(data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BadInput(f"unknown MetaMorphConfig fields: {unknown}")
        for name in ("llm", "vision"):
            if name not in data:
                raise BadInput(f"MetaMorphConfig field {name!r} is missing")
        data["llm"] = LlamaConfig.from_dict(data["llm"])
        data["vision"] = SiglipConfig.from_dict(data["vision"])
        return cls(**data)


class TwoLayerMLP(nn.Module):
    """Linear -> exact (erf) GELU -> Linear, as the authors' nn.Sequential(Linear, GELU,
    Linear); the parameter names keep the Sequential's indices (linear_0, linear_2).

    axis_names: logical names of (input, hidden, output) features.
    """
    hidden_size: int
    out_size: int
    axis_names: tuple[str, str, str]
    kernel_init: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    platform: str | None = None  # see LlamaConfig.platform

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_axis, mid_axis, out_axis = self.axis_names
        dense = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                     platform=self.platform)
        lead = ("batch",) + (None,) * (x.ndim - 3) + ("length",) if x.ndim >= 3 else ("batch",)
        hidden = layers.MultiAxisDense((self.hidden_size,), (in_axis, mid_axis),
                                       name="linear_0", **dense)(x)
        hidden = nn.with_logical_constraint(jax.nn.gelu(hidden, approximate=False),
                                            lead + (mid_axis,))
        out = layers.MultiAxisDense((self.out_size,), (mid_axis, out_axis),
                                    name="linear_2", **dense)(hidden)
        return nn.with_logical_constraint(out, lead + (out_axis,))


# Initialisers as the authors' model gets them: the adapter is built after the LLM's
# weight init, so it keeps torch's nn.Linear default (uniform +-1/sqrt(fan_in)); the head
# is part of the LLaMA model and gets its normal(0.02). Biases start at zero here.
PROJECTOR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
HEAD_INIT = nn.initializers.normal(0.02)


def projector_module(config: MetaMorphConfig, **kwargs) -> TwoLayerMLP:
    d = config.llm.hidden_size
    # Vision width named "embed" as in the tower (fsdp-sharded), hidden named "mlp".
    return TwoLayerMLP(d, d, ("embed", "mlp", "embed"), kernel_init=PROJECTOR_INIT,
                       dtype=layers.to_dtype(config.llm.dtype),
                       param_dtype=layers.to_dtype(config.llm.param_dtype),
                       platform=config.llm.platform, **kwargs)


def vision_head_module(config: MetaMorphConfig, **kwargs) -> TwoLayerMLP:
    return TwoLayerMLP(config.llm.hidden_size, config.vision.hidden_size,
                       ("embed", "mlp", "embed"), kernel_init=HEAD_INIT,
                       dtype=layers.to_dtype(config.llm.dtype),
                       param_dtype=layers.to_dtype(config.llm.param_dtype),
                       platform=config.llm.platform, **kwargs)


def gather_tokens(table: Array, index: Array) -> Array:
    """table [B, M, C] (a row's flat per-image tokens), index [B, T] (-1 = none) -> [B, T, C]
    holding table[b, index[b, t]] (row 0 where index < 0; callers mask those)."""
    safe = jnp.clip(index, 0, table.shape[1] - 1)
    return jnp.take_along_axis(table, safe[..., None], axis=1)


class MetaMorph(nn.Module):
    """SigLIP tower + adapter + LLaMA + vision head. See the module docstring."""
    config: MetaMorphConfig

    def setup(self):
        cfg = self.config
        self.vision_tower = SiglipVisionModel(cfg.vision)
        self.mm_projector = projector_module(cfg)
        self.llm = LlamaForCausalLM(cfg.llm)
        self.vision_head = vision_head_module(cfg)

    def encode_images(self, images: Array) -> Array:
        """images [B, N, H, W, 3] (SigLIP-normalised floats) -> visual tokens [B, N, V, C].

        The frozen tower's normalised tokens, fp32; no gradient flows into the tower.
        """
        if images.ndim != 5:
            raise ValueError(f"images must be [batch, images, height, width, channels], got "
                             f"shape {images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images are {images.dtype}; normalise them first "
                             f"(metamorph_jax.data.images.normalize)")
        batch, count = images.shape[:2]
        tokens = self.vision_tower.visual_tokens(images.reshape(batch * count, *images.shape[2:]))
        tokens = tokens.reshape(batch, count, *tokens.shape[1:])
        return jax.lax.stop_gradient(tokens)

    def project_visual_tokens(self, visual_tokens: Array) -> Array:
        """The adapter: [..., C_vis] -> LLM input embeddings [..., d]."""
        return self.mm_projector(visual_tokens)

    def embed_inputs(self, tokens: Array, image_index: Array | None = None,
                     visual_tokens: Array | None = None) -> Array:
        """Token embeddings [B, T, d] with adapted visual tokens spliced in.

        Where image_index[b, t] >= 0 the embedding is the adapter's output for visual token
        image_index[b, t] of row b's flat [N * V, C] tokens (n * V + k: token k of the
        row's image n), whatever token id stands there.
        """
        embeds = self.llm.embed(tokens)
        if image_index is None and visual_tokens is None:
            return embeds
        if image_index is None or visual_tokens is None:
            raise ValueError("pass image_index and visual tokens (or images) together")
        batch, count, per_image, channels = visual_tokens.shape
        if per_image != self.config.num_image_tokens:
            raise ValueError(f"visual tokens have {per_image} tokens per image, the config's "
                             f"num_image_tokens is {self.config.num_image_tokens}")
        if count == 0:  # rows without image slots: nothing to splice
            return embeds
        # The adapter runs on the N*V tokens, not on all T positions, then is gathered.
        adapted = self.project_visual_tokens(visual_tokens.reshape(batch, count * per_image,
                                                                   channels))
        spliced = gather_tokens(adapted, image_index).astype(embeds.dtype)
        out = jnp.where((image_index >= 0)[..., None], spliced, embeds)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def __call__(self, tokens: Array | None = None, *, positions: Array,
                 segment_ids: Array | None = None, image_index: Array | None = None,
                 images: Array | None = None, visual_tokens: Array | None = None,
                 inputs_embeds: Array | None = None, cache: dict | None = None,
                 cache_index: Array | None = None, compute_logits: bool = False
                 ) -> DecoderOutput:
        """Final hidden states (after the LLM's last norm) [B, T, d]; logits when asked.

        Images come as pixels (`images` [B, N, H, W, 3]) or as the tower's tokens
        (`visual_tokens` [B, N, V, C]), placed by `image_index`. A decoder may pass
        `inputs_embeds` [B, T, d] instead (from embed_inputs, or the adapter applied to the
        vision head's last prediction); `cache` / `cache_index` pass through to the LLM
        (see LlamaForCausalLM).
        """
        if images is not None and visual_tokens is not None:
            raise ValueError("pass images or visual_tokens, not both")
        if inputs_embeds is not None:
            if tokens is not None or images is not None or visual_tokens is not None:
                raise ValueError("inputs_embeds replaces tokens, images and visual_tokens")
            embeds = inputs_embeds
        else:
            if tokens is None:
                raise ValueError("pass tokens or inputs_embeds")
            if images is not None:
                visual_tokens = self.encode_images(images)
            embeds = self.embed_inputs(tokens, image_index, visual_tokens)
        return self.llm(inputs_embeds=embeds, positions=positions, segment_ids=segment_ids,
                        cache=cache, cache_index=cache_index, compute_logits=compute_logits,
                        return_hidden=True)

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """The LLM's zeroed KV cache (LlamaForCausalLM.init_cache)."""
        return self.llm.init_cache(batch_size, max_length)

    def vision_head_outputs(self, hidden: Array) -> Array:
        """Predicted next visual tokens [..., C_vis] fp32, L2-normalised (normalize_vision)."""
        out = self.vision_head(hidden).astype(jnp.float32)
        return vt.l2_normalize(out) if self.config.normalize_vision else out

    def logits(self, hidden: Array) -> Array:
        return self.llm.logits(hidden)

    def init_all(self, tokens: Array, images: Array) -> Array:
        """Runs every part once (the tower's post-layernorm and head included), so that
        `init` creates the whole parameter tree."""
        self.vision_tower(images[:, 0])
        out = self(tokens, positions=jnp.zeros_like(tokens),
                   image_index=jnp.full_like(tokens, -1), images=images, compute_logits=True)
        return self.vision_head_outputs(out.hidden_states)


def _dummy_inputs(config: MetaMorphConfig) -> tuple[Array, Array]:
    size = config.vision.image_size
    return (jnp.zeros((1, 1), jnp.int32),
            jnp.zeros((1, 1, size, size, config.vision.num_channels), jnp.float32))


def init_params(config: MetaMorphConfig, rng: Array) -> Any:
    """Random params for the whole model (boxed with logical axis names; nn.unbox to strip).
    For small configs: this allocates the LLM too (see from_pretrained_parts)."""
    tokens, images = _dummy_inputs(config)
    return MetaMorph(config).init(rng, tokens, images, method=MetaMorph.init_all)["params"]


def param_shapes(config: MetaMorphConfig) -> Any:
    """Nested dict of jax.ShapeDtypeStruct of the unboxed params, without allocating them."""
    boxed = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))
    return nn.unbox(boxed)


def from_pretrained_parts(llm_params: dict, llm_config: LlamaConfig, vision_params: dict,
                          vision_config: SiglipConfig, rng: Array, **fields
                          ) -> tuple[MetaMorphConfig, dict]:
    """A MetaMorph (config, unboxed params) from a pretrained LLaMA and SigLIP tower.

    The LLM vocabulary grows by `<image_start>` and `<image_end>` (ids V and V + 1 of the
    LLaMA's V rows), their input and output rows the mean of the existing rows (the
    authors' rule); the adapter and vision head are freshly initialised from `rng`.
    `fields` set the other MetaMorphConfig fields (num_image_tokens defaults to the tower
    config's num_visual_tokens).
    """
    old_vocab = llm_config.vocab_size
    embedding = llm_params["embed_tokens"]["embedding"]
    if embedding.shape[0] != old_vocab:
        raise ValueError(f"embed_tokens has {embedding.shape[0]} rows, llm_config.vocab_size "
                         f"is {old_vocab}")
    fields.setdefault("num_image_tokens", vision_config.num_visual_tokens)
    fields.setdefault("normalize_vision", vision_config.normalize_visual_tokens)
    config = MetaMorphConfig(llm=llm_config.replace(vocab_size=old_vocab + NUM_NEW_TOKENS),
                             vision=vision_config, image_start_id=old_vocab,
                             image_end_id=old_vocab + 1, **fields)
    projector_rng, head_rng = jax.random.split(rng)
    d = llm_config.hidden_size
    projector = projector_module(config).init(projector_rng,
                                              jnp.zeros((1, 1, vision_config.hidden_size)))
    head = vision_head_module(config).init(head_rng, jnp.zeros((1, 1, d)))
    params = {
        "vision_tower": vision_params,
        "mm_projector": nn.unbox(projector)["params"],
        "llm": token_rows.grow_vocab(llm_params, NUM_NEW_TOKENS, llm_config.tie_word_embeddings),
        "vision_head": nn.unbox(head)["params"],
    }
    return config, params
