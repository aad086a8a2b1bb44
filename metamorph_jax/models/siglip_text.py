"""SigLIP text tower (Hugging Face ``SiglipTextModel``) and the SigLIP dual encoder, in Flax.

The text tower: token embedding + learned position embeddings, the vision tower's pre-LN
encoder blocks (models/siglip.py's ``SiglipEncoder``, reused), a final layer norm, and the
pooled output = the LAST position's hidden state through a linear ``head``. As in
transformers, there is no attention mask: captions are padded to a fixed length with the
pad token (SigLIP's tokenizer pads with its end-of-text token) and every position attends
to every other, padding included; the last position is usually padding, and it is what
SigLIP was trained to pool.

The dual encoder (``SiglipDualEncoder``, transformers' ``SiglipModel``): the vision tower
with its attention-pool head and the text tower side by side, plus the two scalars of the
sigmoid loss, ``logit_scale`` (t = exp(logit_scale)) and ``logit_bias``; logits =
t * normalise(image) @ normalise(text).T + b, rows = images (training/contrastive_loss.py
has the loss).

Parameter names follow transformers' (embeddings/token_embedding, embeddings/
position_embedding, encoder/layers..., final_layer_norm, head; vision_model, text_model,
logit_scale, logit_bias) so that a converter is a table (convert/siglip_text.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from metamorph_jax.models import layers
from metamorph_jax.models import siglip

# Defaults of transformers' SiglipTextConfig: a config.json omits fields left at these.
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 64,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "projection_size": None,
}


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
    """SigLIP text tower. Defaults: transformers' SiglipTextConfig (SigLIP base)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    projection_size: int | None = None   # the head's output width; None: hidden_size
    # Implementation (not part of the checkpoint).
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None
    platform: str | None = None

    def __post_init__(self):
        for key in ("vocab_size", "max_position_embeddings"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be a positive integer")
        if self.projection_size is not None and self.projection_size <= 0:
            raise ValueError(f"projection_size={self.projection_size!r} must be positive or None")
        self.block_config()   # the encoder's checks (divisibility, activation, remat)

    @property
    def output_size(self) -> int:
        return self.hidden_size if self.projection_size is None else self.projection_size

    def block_config(self) -> siglip.SiglipConfig:
        """The SiglipConfig the shared encoder blocks read (only the block fields matter)."""
        return siglip.SiglipConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps, use_head=False, dtype=self.dtype,
            param_dtype=self.param_dtype, scan_layers=self.scan_layers,
            remat_policy=self.remat_policy, attention_impl=self.attention_impl,
            platform=self.platform)

    def replace(self, **changes) -> "SiglipTextConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["platform"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SiglipTextConfig":
        """Inverse of to_dict; unknown fields are an error."""
        unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown SiglipTextConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str | None = None,
                **overrides) -> "SiglipTextConfig":
        """From a SiglipTextConfig's config.json dict, or a full SiglipConfig's (its
        "text_config"). Missing fields take transformers' defaults; `source` names the
        file in errors."""
        where = f"{source}: " if source else ""
        nest = ""
        config = dict(config)
        if config.get("model_type") == "siglip" or "text_config" in config:
            if not isinstance(config.get("text_config"), Mapping):
                raise ValueError(f"{where}field 'text_config' is missing from a full SigLIP config")
            config = dict(config["text_config"])
            nest = "text_config."
        elif config.get("model_type", "siglip_text_model") != "siglip_text_model":
            raise ValueError(f"{where}field 'model_type' is {config['model_type']!r}, expected "
                             "'siglip_text_model' or 'siglip'")
        values = {k: config.get(k, default) for k, default in HF_TEXT_DEFAULTS.items()}
        if values["attention_dropout"]:
            raise ValueError(f"{where}field '{nest}attention_dropout'="
                             f"{values['attention_dropout']} is not supported (no dropout)")
        eos = values["eos_token_id"]
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"{where}field '{nest}eos_token_id'={eos!r}: one id expected")
            eos = eos[0]
        kwargs = {k: values[k] for k in HF_TEXT_DEFAULTS if k not in ("attention_dropout",)}
        kwargs["eos_token_id"] = eos
        kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}{error}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads as a SiglipTextModel."""
        return {
            "architectures": ["SiglipTextModel"], "model_type": "siglip_text_model",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act, "layer_norm_eps": self.layer_norm_eps,
            "attention_dropout": 0.0, "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "projection_size": self.output_size,
        }


class SiglipTextEmbeddings(nn.Module):
    """Token embedding + learned position embedding (positions 0..L-1)."""

    config: SiglipTextConfig

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"input_ids hold {length} positions, more than "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                            ("vocab", "embed"))
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                          embedding_init=init, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                             param_dtype=param_dtype,
                             embedding_init=nn.with_logical_partitioning(
                                 nn.initializers.normal(stddev=0.02), ("positions", "embed")),
                             name="position_embedding")(jnp.arange(length))
        embeddings = tokens + positions[None]
        return nn.with_logical_constraint(embeddings, ("batch", "length", "embed"))


class SiglipTextModel(nn.Module):
    """SigLIP text tower. ``__call__(input_ids [B, L])`` returns {last_hidden_state [B, L, C]
    (after the final layer norm), pooler_output [B, output_size] (last position -> head)}."""

    config: SiglipTextConfig

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> dict[str, jnp.ndarray]:
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        hidden = SiglipTextEmbeddings(cfg, name="embeddings")(input_ids)
        hidden, _ = siglip.SiglipEncoder(cfg.block_config(), name="encoder")(hidden)
        last = layers.layer_norm(cfg.layer_norm_eps, "final_layer_norm", param_dtype)(hidden)
        last = last.astype(dtype)
        pooled = nn.Dense(cfg.output_size, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=nn.with_logical_partitioning(
                              nn.initializers.lecun_normal(), ("embed", "mlp")),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                          name="head")(last[:, -1])
        return {"last_hidden_state": last, "pooler_output": pooled}


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    """x / ||x|| over the last axis, as transformers' SiglipModel (no epsilon), in fp32."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class SiglipDualEncoder(nn.Module):
    """Vision tower (with its attention-pool head) + text tower + logit scale and bias.

    ``__call__(pixel_values [B, H, W, C], input_ids [B, L])`` returns {image_embeds,
    text_embeds (both L2-normalised [B, D]), logits [B_images, B_texts] = exp(logit_scale)
    * image_embeds @ text_embeds.T + logit_bias}. The two towers' pooled widths must agree.
    """

    vision: siglip.SiglipConfig
    text: SiglipTextConfig
    logit_scale_init: float = math.log(10.0)   # Zhai et al. 2023: t' = log 10, b = -10
    logit_bias_init: float = -10.0

    def setup(self):
        if not self.vision.use_head:
            raise ValueError("the dual encoder pools images with the vision tower's attention "
                             "head: the SiglipConfig needs use_head=True")
        if self.vision.hidden_size != self.text.output_size:
            raise ValueError(f"the vision tower pools to {self.vision.hidden_size} features, the "
                             f"text tower to {self.text.output_size}; set the text config's "
                             f"projection_size to {self.vision.hidden_size}")
        self.vision_model = siglip.SiglipVisionModel(self.vision)
        self.text_model = SiglipTextModel(self.text)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(self.logit_scale_init), (None,)), (1,), jnp.float32)
        self.logit_bias = self.param("logit_bias", nn.with_logical_partitioning(
            nn.initializers.constant(self.logit_bias_init), (None,)), (1,), jnp.float32)

    def __call__(self, pixel_values: jnp.ndarray, input_ids: jnp.ndarray) -> dict:
        image = l2_normalize(self.vision_model(pixel_values)["pooler_output"])
        text = l2_normalize(self.text_model(input_ids)["pooler_output"])
        logits = (jnp.exp(self.logit_scale[0]) * jnp.matmul(image, text.T, precision="highest")
                  + self.logit_bias[0])
        return {"image_embeds": image, "text_embeds": text, "logits": logits}


def init_text_params(config: SiglipTextConfig, rng: jax.Array, length: int = 4) -> Any:
    """Random text-tower params (boxed with logical axis names; nn.unbox to strip)."""
    return SiglipTextModel(config).init(rng, jnp.zeros((1, length), jnp.int32))["params"]


def text_param_shapes(config: SiglipTextConfig) -> Any:
    """Nested dict of jax.ShapeDtypeStruct of the unboxed text params, allocating nothing."""
    return nn.unbox(jax.eval_shape(lambda rng: init_text_params(config, rng), jax.random.key(0)))
