"""SigLIP vision tower (Hugging Face ``SiglipVisionModel``) in Flax Linen.

Patch embedding (a stride-p convolution), learned position embeddings, pre-LN
encoder blocks, a post-layernorm and an optional multi-head attention-pooling head.
Any size from a tiny test model to So400m/14@384; ``SiglipConfig.from_hf`` reads a
Hugging Face ``config.json``'s dict (a SiglipVisionModel's, or the vision half of a full
SiglipModel's).

Encoder blocks run under ``nn.scan`` (params stacked on a leading "layers" axis,
compile time flat in depth) with ``nn.remat`` under a configurable policy; with
``scan_layers=False`` the same blocks are unrolled (params ``layers_0``, ``layers_1``,
...) and the math is the same.

MetaMorph's visual tokens (``SiglipVisionModel.visual_tokens``) are an encoder
layer's output *before* the post-layernorm (Hugging Face ``hidden_states[-1]`` by
default), resized from the 27x27 grid to 8x8 and L2-normalised; see visual_tokens.py.

Parameter names follow Hugging Face's so that the converter (convert/siglip.py) is
a table.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from metamorph_jax.input_errors import BadInput
from metamorph_jax.models import layers
from metamorph_jax.models import visual_tokens as vt

# Defaults of transformers' SiglipVisionConfig: a config.json omits fields left at these.
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": True,
}

# hidden_act -> (jax function). The tanh approximation is what SigLIP checkpoints use.
_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP vision tower + MetaMorph visual-token settings. Defaults: So400m/14@384."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    use_head: bool = True
    # MetaMorph visual tokens. visual_token_layer indexes Hugging Face's hidden_states
    # tuple (0 = embeddings, i = output of block i, -1 = last block, before post-LN).
    visual_token_layer: int = -1
    num_visual_tokens: int = 64
    normalize_visual_tokens: bool = True
    # Implementation (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"  # none | full | dots | dots_no_batch | everything (layers.py)
    attention_impl: str | None = None  # None | xla | cudnn | reference (layers.py)
    # Devices the model is compiled for (LlamaConfig.platform); None: jax.default_backend().
    platform: str | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise BadInput(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        # image_size need not be a multiple of patch_size (So400m: 384 / 14): the
        # stride-p VALID convolution drops the remainder, as in transformers.
        if self.hidden_act not in _ACTIVATIONS:
            raise BadInput(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        if self.remat_policy != "none" and self.remat_policy not in layers.REMAT_POLICIES:
            raise BadInput(
                f"remat_policy={self.remat_policy!r} is not one of {['none', *layers.REMAT_POLICIES]}"
            )
        if not -(self.num_hidden_layers + 1) <= self.visual_token_layer <= self.num_hidden_layers:
            raise BadInput(
                f"visual_token_layer={self.visual_token_layer} is outside the "
                f"{self.num_hidden_layers + 1} hidden states (embeddings + {self.num_hidden_layers} blocks)"
            )
        vt.grid_side(self.num_visual_tokens, "num_visual_tokens")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side at the configured image size (27 for So400m/14@384, remainder dropped)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def visual_token_layer_index(self) -> int:
        """visual_token_layer as a non-negative index into [embeddings, block 1, ..., block N]."""
        return self.visual_token_layer % (self.num_hidden_layers + 1)

    def replace(self, **changes) -> "SiglipConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["platform"]  # where it runs, not what it is
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SiglipConfig":
        """Inverse of to_dict; unknown fields are an error."""
        unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise BadInput(f"unknown SiglipConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str | None = None,
                **overrides) -> "SiglipConfig":
        """Build from a Hugging Face config.json's dict (`source`: the file, for errors).

        Accepts a SiglipVisionConfig, or a full SiglipConfig (its "vision_config" is
        used). Fields the file omits take transformers' defaults. ``overrides`` set
        the fields that are not in the checkpoint (dtype, scan_layers, visual tokens...).
        Unsupported values raise ValueError naming the file and the field.
        """
        where = f"{source}: " if source else ""  # error prefix: the file
        nest = ""  # field prefix inside a full SigLIP config
        config = dict(config)
        if config.get("model_type") == "siglip" or "vision_config" in config:
            if not isinstance(config.get("vision_config"), Mapping):
                raise BadInput(f"{where}field 'vision_config' is missing from a full SigLIP config")
            config = dict(config["vision_config"])
            nest = "vision_config."
        elif config.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise BadInput(
                f"{where}field 'model_type' is {config['model_type']!r}, expected "
                f"'siglip_vision_model' or 'siglip'"
            )
        values = {k: config.get(k, default) for k, default in HF_VISION_DEFAULTS.items()}
        if values["attention_dropout"]:
            raise BadInput(
                f"{where}field '{nest}attention_dropout'={values['attention_dropout']} is not supported "
                f"(the tower is inference/frozen only; dropout is not implemented)"
            )
        if values["hidden_act"] not in _ACTIVATIONS:
            raise BadInput(
                f"{where}field '{nest}hidden_act'={values['hidden_act']!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}"
            )
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_channels", "image_size", "patch_size"):
            if not isinstance(values[key], int) or values[key] <= 0:
                raise BadInput(f"{where}field '{nest}{key}'={values[key]!r} must be a positive integer")
        kwargs = dict(
            hidden_size=values["hidden_size"],
            intermediate_size=values["intermediate_size"],
            num_hidden_layers=values["num_hidden_layers"],
            num_attention_heads=values["num_attention_heads"],
            num_channels=values["num_channels"],
            image_size=values["image_size"],
            patch_size=values["patch_size"],
            hidden_act=values["hidden_act"],
            layer_norm_eps=float(values["layer_norm_eps"]),
            use_head=bool(values["vision_use_head"]),
        )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as error:
            raise BadInput(f"{where}{error}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads as a SiglipVisionModel."""
        return {
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0,
            "vision_use_head": self.use_head,
        }


# ----------------------------------------------------------------------------- helpers


def _partitioned(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


def _layer_norm(config: SiglipConfig, name: str) -> nn.LayerNorm:
    return layers.layer_norm(config.layer_norm_eps, name, layers.to_dtype(config.param_dtype))


def resize_position_embedding(table: jnp.ndarray, new_grid: tuple[int, int]) -> jnp.ndarray:
    """Resize a [side*side, C] position-embedding table to a (height, width) patch grid.

    Bicubic, align_corners=False, as transformers' ``interpolate_pos_encoding``; use it
    to run at another resolution or to re-grid a checkpoint's table once. Returns
    [height*width, C] in the table's dtype (computed in fp32).
    """
    num_positions, channels = table.shape
    side = vt.grid_side(num_positions, "position_embedding rows")
    height, width = new_grid
    if (height, width) == (side, side):
        return table
    grid = table.astype(jnp.float32).reshape(side, side, channels)
    rows = jnp.asarray(vt.bicubic_resize_matrix(side, height))
    cols = jnp.asarray(vt.bicubic_resize_matrix(side, width))
    grid = jnp.einsum("oh,hwc->owc", rows, grid, precision="highest")
    grid = jnp.einsum("pw,owc->opc", cols, grid, precision="highest")
    return grid.reshape(height * width, channels).astype(table.dtype)


# ----------------------------------------------------------------------------- modules


class SiglipEmbeddings(nn.Module):
    """Non-overlapping patch convolution + learned position embeddings."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, pixel_values: jnp.ndarray, interpolate_pos_encoding: bool = False) -> jnp.ndarray:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"pixel_values must be [batch, height, width, {cfg.num_channels}] (channels last), "
                f"got shape {pixel_values.shape}"
            )
        patches = nn.Conv(
            features=cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=_partitioned(nn.initializers.lecun_normal(), ("height", "width", "channels", "embed")),
            bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
        )(pixel_values.astype(dtype))
        batch, grid_h, grid_w, _ = patches.shape
        embeddings = patches.reshape(batch, grid_h * grid_w, cfg.hidden_size)
        table = self.param(
            "position_embedding",
            _partitioned(nn.initializers.normal(stddev=cfg.hidden_size**-0.5), ("positions", "embed")),
            (cfg.num_patches, cfg.hidden_size),
            param_dtype,
        )
        if (grid_h, grid_w) != (cfg.grid_size, cfg.grid_size):
            if not interpolate_pos_encoding:
                raise ValueError(
                    f"pixel_values are {pixel_values.shape[1]}x{pixel_values.shape[2]} but the config's "
                    f"image_size is {cfg.image_size}; pass interpolate_pos_encoding=True to resize the "
                    f"position embeddings"
                )
            table = resize_position_embedding(table, (grid_h, grid_w))
        embeddings = embeddings + table.astype(dtype)[None]
        return nn.with_logical_constraint(embeddings, ("batch", "length", "embed"))


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)

        def project(name):
            return layers.MultiAxisDense((cfg.num_attention_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
                                  dtype=dtype, param_dtype=param_dtype, platform=cfg.platform,
                                  name=name)(hidden)

        axes = ("batch", "length", "heads", "head_dim")
        query = nn.with_logical_constraint(project("q_proj"), axes)
        key = nn.with_logical_constraint(project("k_proj"), axes)
        value = nn.with_logical_constraint(project("v_proj"), axes)
        attended = layers.dot_product_attention(query, key, value, implementation=cfg.attention_impl,
                                                platform=cfg.platform)
        attended = nn.with_logical_constraint(attended, axes)
        return layers.MultiAxisDense((cfg.hidden_size,), ("heads", "head_dim", "embed"), num_in=2,
                              dtype=dtype, param_dtype=param_dtype, platform=cfg.platform,
                              name="out_proj")(attended)


class SiglipMLP(nn.Module):
    """fc1 -> GELU (tanh approximation by default) -> fc2."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        hidden = nn.Dense(
            cfg.intermediate_size,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=_partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=_partitioned(nn.initializers.zeros, ("mlp",)),
            name="fc1",
        )(hidden)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = _ACTIVATIONS[cfg.hidden_act](hidden)
        return nn.Dense(
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=_partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(hidden)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)).

    Called as a scan body: ``(hidden, _) -> (hidden, per-layer output)``, where the
    per-layer output is the block's result when ``collect_hidden`` and None otherwise.
    """

    config: SiglipConfig
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, hidden: jnp.ndarray, _unused=None):
        cfg = self.config
        dtype = layers.to_dtype(cfg.dtype)
        normed = _layer_norm(cfg, "layer_norm1")(hidden).astype(dtype)
        hidden = hidden + SiglipAttention(cfg, name="self_attn")(normed)
        normed = _layer_norm(cfg, "layer_norm2")(hidden).astype(dtype)
        hidden = hidden + SiglipMLP(cfg, name="mlp")(normed)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        return hidden, (hidden if self.collect_hidden else None)


class SiglipEncoder(nn.Module):
    """The stack of encoder blocks, scanned (params under "layers") or unrolled ("layers_{i}").

    Returns (last hidden, all hidden states or None); all hidden states are stacked
    [num_layers, batch, length, embed], one per block output.
    """

    config: SiglipConfig

    @nn.compact
    def __call__(self, hidden: jnp.ndarray, collect_hidden: bool = False):
        cfg = self.config
        # Under scan the loop already keeps XLA from CSE-ing the recompute away.
        block = layers.maybe_remat(SiglipEncoderLayer, cfg.remat_policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            hidden, per_layer = scanned(cfg, collect_hidden, name="layers")(hidden, None)
            return hidden, per_layer
        outputs = []
        for index in range(cfg.num_hidden_layers):
            hidden, _ = block(cfg, False, name=f"layers_{index}")(hidden, None)
            outputs.append(hidden)
        return hidden, (jnp.stack(outputs) if collect_hidden else None)


class _PackedMultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first, no mask) with a packed in-projection."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, queries: jnp.ndarray, memory: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        packed = (3, cfg.num_attention_heads, cfg.head_dim)
        kernel = self.param(
            "in_proj_kernel",
            _partitioned(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3)),
                         ("embed", None, "heads", "head_dim")),
            (cfg.hidden_size, *packed),
            param_dtype,
        ).astype(dtype)
        bias = self.param(
            "in_proj_bias", _partitioned(nn.initializers.zeros, (None, "heads", "head_dim")), packed, param_dtype
        ).astype(dtype)
        query = jnp.einsum("btc,chd->bthd", queries, kernel[:, 0]) + bias[0]
        key = jnp.einsum("bsc,chd->bshd", memory, kernel[:, 1]) + bias[1]
        value = jnp.einsum("bsc,chd->bshd", memory, kernel[:, 2]) + bias[2]
        attended = layers.dot_product_attention(query, key, value, implementation=cfg.attention_impl,
                                                platform=cfg.platform)
        return layers.MultiAxisDense((cfg.hidden_size,), ("heads", "head_dim", "embed"), num_in=2,
                              dtype=dtype, param_dtype=param_dtype, platform=cfg.platform,
                              name="out_proj")(attended)


class SiglipAttentionPoolingHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens, then an MLP.

    The q/k/v projection is stored packed, as torch.nn.MultiheadAttention does, so a
    checkpoint's ``in_proj_weight`` [3C, C] is one table entry: kernel [C, 3, heads, head_dim].
    """

    config: SiglipConfig

    @nn.compact
    def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        probe = self.param(
            "probe",
            _partitioned(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, cfg.hidden_size),
            param_dtype,
        )
        pooled = _PackedMultiheadAttention(cfg, name="attention")(
            jnp.broadcast_to(probe.astype(dtype), (hidden.shape[0], 1, cfg.hidden_size)), hidden
        )
        normed = _layer_norm(cfg, "layernorm")(pooled).astype(dtype)
        pooled = pooled + SiglipMLP(cfg, name="mlp")(normed)
        return pooled[:, 0]


class SiglipVisionModel(nn.Module):
    """SigLIP vision tower. Images are channels-last [batch, height, width, channels].

    ``__call__`` returns a dict:
      last_hidden_state [B, T, C]: after the post-layernorm (as transformers).
      pre_norm_state [B, T, C]: the last block's output before it (HF hidden_states[-1]).
      pooler_output [B, C]: the attention-pooling head's output (when config.use_head).
      hidden_states [num_layers + 1, B, T, C]: embeddings then every block's output
        (only when output_hidden_states=True), as HF's hidden_states tuple stacked.
    """

    config: SiglipConfig

    def setup(self):
        cfg = self.config
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = _layer_norm(cfg, "post_layernorm")
        if cfg.use_head:
            self.head = SiglipAttentionPoolingHead(cfg)

    def __call__(
        self,
        pixel_values: jnp.ndarray,
        *,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> dict[str, jnp.ndarray]:
        cfg = self.config
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding)
        pre_norm, per_layer = self.encoder(embeddings, collect_hidden=output_hidden_states)
        last = self.post_layernorm(pre_norm).astype(layers.to_dtype(cfg.dtype))
        outputs = {"last_hidden_state": last, "pre_norm_state": pre_norm}
        if cfg.use_head:
            outputs["pooler_output"] = self.head(last)
        if output_hidden_states:
            outputs["hidden_states"] = jnp.concatenate([embeddings[None], per_layer], axis=0)
        return outputs

    def visual_tokens(self, pixel_values: jnp.ndarray, *, interpolate_pos_encoding: bool = False) -> jnp.ndarray:
        """MetaMorph's visual tokens: [B, num_visual_tokens, C] fp32.

        The output of hidden state ``config.visual_token_layer`` (before the
        post-layernorm), grid-resized bilinearly as torch does, then L2-normalised
        when ``config.normalize_visual_tokens``. The post-layernorm and the head
        are not run.
        """
        cfg = self.config
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding)
        index = cfg.visual_token_layer_index
        if index == cfg.num_hidden_layers:
            features, _ = self.encoder(embeddings, collect_hidden=False)
        elif index == 0:
            features = embeddings
        else:
            # An earlier block: collect every block's output and take that one.
            _, per_layer = self.encoder(embeddings, collect_hidden=True)
            features = per_layer[index - 1]
        return vt.reduce_visual_tokens(features, cfg.num_visual_tokens, cfg.normalize_visual_tokens)


def init_params(config: SiglipConfig, rng: jax.Array, batch_size: int = 1) -> Any:
    """Random params for ``config`` (boxed with logical axis names; nn.unbox to strip)."""
    model = SiglipVisionModel(config)
    images = jnp.zeros((batch_size, config.image_size, config.image_size, config.num_channels), jnp.float32)
    return model.init(rng, images)["params"]


def param_shapes(config: SiglipConfig) -> Any:
    """Nested dict of jax.ShapeDtypeStruct of the unboxed params, without allocating them."""
    boxed = jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))
    return nn.unbox(boxed)
