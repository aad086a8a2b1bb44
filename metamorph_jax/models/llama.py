"""LLaMA-3 / 3.1 decoder in Flax Linen.

Grouped-query attention, RoPE (optionally with LLaMA-3.1 frequency scaling), SwiGLU,
RMSNorm, tied or untied embeddings. Works on packed rows (positions and segment ids
given; attention never crosses segments) and decodes with a KV cache.

Parameter names mirror transformers' LlamaForCausalLM (embed_tokens, layers/self_attn/
q_proj, ...), which keeps the checkpoint converter a table (convert/llama.py).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.input_errors import BadInput
from metamorph_jax.models import layers

Array = jax.Array
NORMAL_INIT = nn.initializers.normal(0.02)  # transformers' initializer_range
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # LLaMA-3.1 "llama3" scaling: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings; None for plain RoPE.
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 128000
    eos_token_ids: tuple[int, ...] = (128001, 128009)
    pad_token_id: int | None = None
    # Runtime choices, not part of the checkpoint's math.
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None
    # Decoding layout: q/k/v and gate/up kernels concatenated (see fuse_projections).
    fused_projections: bool = False
    # The devices the model is compiled for ("cpu", "gpu", "tpu"): picks the attention
    # kernel and the dense layers' backward. Set from the mesh by whoever builds the model
    # for one (sharding.mesh_platform); None is jax.default_backend(). Not saved.
    platform: str | None = None

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["platform"]  # where it runs, not what it is
        out["rope_scaling"] = self.rope_scaling_dict
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LlamaConfig":
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise BadInput(f"unknown LlamaConfig fields: {sorted(unknown)}")
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = tuple(sorted(data["rope_scaling"].items()))
        if "eos_token_ids" in data:
            data["eos_token_ids"] = tuple(data["eos_token_ids"])
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict, **runtime) -> "LlamaConfig":
        """From a transformers LlamaConfig dict (config.json's contents).

        Every field that changes the math is read; an unsupported value is a ValueError
        naming the field. `runtime` sets dtype, scan_layers and the like.
        """
        hf = dict(hf)
        if hf.get("model_type", "llama") != "llama":
            raise BadInput(f"field 'model_type' is {hf.get('model_type')!r}, not 'llama'")
        if hf.get("hidden_act", "silu") != "silu":
            raise BadInput(f"field 'hidden_act' = {hf['hidden_act']!r} is not supported (silu only)")
        if hf.get("attention_dropout", 0.0):
            raise BadInput("field 'attention_dropout' must be 0 (dropout is not implemented)")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads"):
            if field not in hf:
                raise BadInput(f"missing field {field!r}")
        theta, scaling = _rope(hf)
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id")).replace(**runtime)

    def to_hf(self) -> dict:
        """A config.json dict that transformers loads as a LlamaForCausalLM."""
        rope = {"rope_type": "default" if self.rope_scaling is None else "llama3",
                "rope_theta": self.rope_theta, **(self.rope_scaling_dict or {})}
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": self.pad_token_id,
            # transformers >= 5 reads rope_parameters; older releases read the two legacy fields.
            "rope_parameters": rope, "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(rope),
        }


def _rope(hf: dict) -> tuple[float, tuple | None]:
    """(theta, llama3 scaling) from either the transformers-5 `rope_parameters` or the
    older `rope_theta` + `rope_scaling` fields."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise BadInput(f"field 'rope_type' = {rope_type!r} is not supported "
                       f"(supported: {SUPPORTED_ROPE_TYPES})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise BadInput("field 'partial_rotary_factor' != 1 is not supported")
    if rope_type == "default":
        return float(theta), None
    missing = [k for k in LLAMA3_ROPE_FIELDS if k not in params]
    if missing:
        raise BadInput(f"llama3 rope scaling lacks field(s) {missing}")
    return float(theta), tuple(sorted((k, params[k]) for k in LLAMA3_ROPE_FIELDS))


@flax.struct.dataclass
class DecoderOutput:
    logits: Array | None
    hidden_states: Array | None    # final hidden states after the last norm
    cache: dict | None


def abstract_boxed_params(model: "LlamaForCausalLM"):
    """The model's parameter shapes (no memory), still boxed with their logical axis names
    (what sharding.logical_shardings turns into placements)."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, positions=dummy))["params"]


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned params (layers/... stacked on axis 0) -> unrolled params (layers_0/...)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled params (layers_0/...) -> scanned params (layers/... stacked on axis 0).

    The inverse of unstack_layers; host (numpy) leaves stay on the host."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
    out["layers"] = jax.tree.map(
        lambda *leaves: (np.stack(leaves) if isinstance(leaves[0], np.ndarray)
                         else jnp.stack(leaves)), *per_layer)
    return out


def with_layer_layout(params: dict, num_layers: int, scanned: bool) -> dict:
    """params in the scanned (`layers/...`) or unrolled (`layers_i/...`) layout, converted
    only when they are in the other one."""
    if scanned == ("layers" in params):
        return params
    return stack_layers(params, num_layers) if scanned else unstack_layers(params, num_layers)


def fuse_projections(params: dict) -> dict:
    """Params for `fused_projections=True`: q/k/v and gate/up kernels (and biases) joined.

    Decoding at batch 1 is a chain of matrix-vector products; on CPU four larger ones per
    layer run ~10% faster than seven. Works on scanned and unrolled params; the layout
    is for decoding only (checkpoints and the converter keep the separate names).
    """
    def flat_heads(x):  # [..., heads, head_dim] -> [..., heads*head_dim]
        return x.reshape(*x.shape[:-2], -1)

    def fuse_layer(layer: dict) -> dict:
        layer = dict(layer)
        attn = dict(layer["self_attn"])
        names = ("q_proj", "k_proj", "v_proj")
        fused = {"kernel": jnp.concatenate([flat_heads(attn[n]["kernel"]) for n in names],
                                           axis=-1)}
        if "bias" in attn["q_proj"]:
            fused["bias"] = jnp.concatenate([flat_heads(attn[n]["bias"]) for n in names], -1)
        layer["self_attn"] = {"qkv_proj": fused,
                              **{k: v for k, v in attn.items() if k not in names}}
        mlp = dict(layer["mlp"])
        gate, up = mlp.pop("gate_proj"), mlp.pop("up_proj")
        mlp["gate_up_proj"] = {k: jnp.concatenate([gate[k], up[k]], axis=-1) for k in gate}
        layer["mlp"] = mlp
        return layer

    return {name: fuse_layer(value) if name == "layers" or name.startswith("layers_") else value
            for name, value in params.items()}


def _update_cache(cache: Array, new: Array, index: Array) -> Array:
    """Writes new [B,T,K,D] into the head-major cache [B,K,S,D] at per-row offsets index [B].

    One dynamic_update_slice per row: XLA updates the cache in place. (A vmapped update
    becomes a scatter, which XLA's CPU backend ran as several copies of the whole cache
    per layer and step.)
    """
    new = new.transpose(0, 2, 1, 3).astype(cache.dtype)
    for row in range(cache.shape[0]):
        cache = jax.lax.dynamic_update_slice(cache, new[row:row + 1], (row, 0, index[row], 0))
    return cache


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, rope: tuple[Array, Array], attend: Array,
                 cache_index: Array | None, layer_cache: tuple[Array, Array] | None):
        """attend: segment ids [B,T] without cache_index, else the decoding mask [B,1,T,S]."""
        segment_ids, decode_mask = (attend, None) if cache_index is None else (None, attend)
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)

        def proj(num_heads, heads_axis, name):
            return layers.MultiAxisDense((num_heads, cfg.head_dim), ("embed", heads_axis, "head_dim"),
                                         use_bias=cfg.attention_bias, kernel_init=NORMAL_INIT,
                                         dtype=dtype, param_dtype=param_dtype,
                                         platform=cfg.platform, name=name)
        if cfg.fused_projections:
            widths = (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)
            qkv = layers.MultiAxisDense((sum(widths) * cfg.head_dim,), ("embed", "fused_qkv"),
                                        use_bias=cfg.attention_bias, kernel_init=NORMAL_INIT,
                                        dtype=dtype, param_dtype=param_dtype,
                                        platform=cfg.platform, name="qkv_proj")(x)
            qkv = qkv.reshape(*qkv.shape[:-1], sum(widths), cfg.head_dim)
            query, key, value = jnp.split(qkv, np.cumsum(widths)[:-1], axis=-2)
        else:
            query = proj(cfg.num_heads, "heads", "q_proj")(x)
            key = proj(cfg.num_kv_heads, "kv_heads", "k_proj")(x)
            value = proj(cfg.num_kv_heads, "kv_heads", "v_proj")(x)
        query = layers.apply_rotary(query, rope)
        key = layers.apply_rotary(key, rope)
        query = nn.with_logical_constraint(query, ("batch", "length", "heads", "head_dim"))
        key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "head_dim"))
        value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "head_dim"))

        new_cache = None
        if layer_cache is not None and cache_index is None:
            # Prefill of an empty cache: the keys go in at position 0, and attention needs
            # only this call's own keys, causally (not the whole cache's length).
            new_cache = tuple(jax.lax.dynamic_update_slice(
                stored, fresh.transpose(0, 2, 1, 3).astype(stored.dtype), (0,) * stored.ndim)
                for stored, fresh in zip(layer_cache, (key, value)))
        elif layer_cache is not None:
            new_cache = (_update_cache(layer_cache[0], key, cache_index),
                         _update_cache(layer_cache[1], value, cache_index))
            # Back to [B,S,K,D] for the attention call; the CPU attention's own transpose
            # to head-major then cancels this one, so the cache is never copied.
            key, value = (c.transpose(0, 2, 1, 3).astype(dtype) for c in new_cache)
        # Full forward and prefill: causal within segments (the kernel gets the segment
        # ids, not a [B,1,T,T] mask, so splash attention never materialises one).
        # Decoding: the cache-position mask.
        if cache_index is None:
            out = layers.dot_product_attention(query, key, value, segment_ids=segment_ids,
                                               causal=True, implementation=cfg.attention_impl,
                                               platform=cfg.platform)
        else:
            out = layers.dot_product_attention(query, key, value, mask=decode_mask,
                                               implementation=cfg.attention_impl,
                                               platform=cfg.platform)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = layers.MultiAxisDense((cfg.hidden_size,), ("heads", "head_dim", "embed"), num_in=2,
                                    use_bias=cfg.attention_bias, kernel_init=NORMAL_INIT,
                                    dtype=dtype, param_dtype=param_dtype, platform=cfg.platform,
                                    name="o_proj")(out)
        return out, new_cache


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, hidden: Array, rope: tuple[Array, Array], attend: Array,
                 cache_index: Array | None, layer_cache):
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        attn_out, new_cache = LlamaAttention(cfg, name="self_attn")(
            layers.RMSNorm(**norm, name="input_layernorm")(hidden),
            rope, attend, cache_index, layer_cache)
        hidden = hidden + attn_out
        mlp_out = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias,
                                  dtype=dtype, param_dtype=param_dtype,
                                  fused=cfg.fused_projections, platform=cfg.platform,
                                  name="mlp")(
            layers.RMSNorm(**norm, name="post_attention_layernorm")(hidden))
        hidden = nn.with_logical_constraint(hidden + mlp_out, ("batch", "length", "embed"))
        return hidden, new_cache


class LlamaForCausalLM(nn.Module):
    """The decoder with its LM head.

    Call with `tokens` [B,T] or `inputs_embeds` [B,T,E], plus `positions` [B,T].
    Training / full forward: `segment_ids` [B,T] (0 = padding) keep packed sequences
    apart. Decoding: pass `cache` (from `init_cache`) and `cache_index` [B] (where each
    row's new tokens are written); attention then covers the cache causally. Prefill of an
    empty cache: pass `cache` without `cache_index`; the tokens are written from position
    0 and attend causally to each other only (as without a cache), so a prompt's
    attention does not span the cache's whole length.
    """
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        block = layers.maybe_remat(LlamaDecoderLayer, cfg.remat_policy,
                                   prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layer_list = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.norm = layers.RMSNorm(cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.MultiAxisDense((cfg.vocab_size,), ("embed", "vocab"),
                                                 use_bias=False, dtype=dtype,
                                                 param_dtype=param_dtype,
                                                 kernel_init=NORMAL_INIT,
                                                 platform=cfg.platform)

    def embed(self, tokens: Array) -> Array:
        return self.embed_tokens(tokens)

    def logits(self, hidden: Array) -> Array:
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "vocab"))

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """Zeroed KV cache {"key","value"}, head-major: each layer's is
        [B, kv_heads, max_length, head_dim].

        Scanned layers hold one array per name with the layers stacked in front; unrolled
        layers a list with one array per layer, so that a decoding step updates each in
        place instead of slicing it out of, and stacking it back into, a joint array.
        """
        cfg = self.config
        shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        dtype = layers.to_dtype(cfg.dtype)
        if cfg.scan_layers:
            return {name: jnp.zeros((cfg.num_layers, *shape), dtype) for name in ("key", "value")}
        return {name: [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
                for name in ("key", "value")}

    def __call__(self, tokens: Array | None = None, *, positions: Array,
                 segment_ids: Array | None = None, inputs_embeds: Array | None = None,
                 cache: dict | None = None, cache_index: Array | None = None,
                 compute_logits: bool = True, return_hidden: bool = False) -> DecoderOutput:
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of tokens and inputs_embeds")
        if tokens is not None:
            hidden = self.embed(tokens)
        else:
            hidden = inputs_embeds.astype(layers.to_dtype(self.config.dtype))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        batch, length = hidden.shape[:2]
        cache_length = None if cache is None else jax.tree.leaves(cache["key"])[0].shape[-2]
        if cache is not None and cache_index is None and length > cache_length:
            raise ValueError(f"a prefill of {length} tokens does not fit a cache of "
                             f"{cache_length} positions")
        if cache is not None and cache_index is not None:
            query_index = cache_index[:, None] + jnp.arange(length)[None, :]
            key_index = jnp.arange(cache_length)
            # What each layer's attention reads: the decoding mask, or segment ids.
            attend = (key_index[None, None, :] <= query_index[:, :, None])[:, None]
        else:
            attend = (jnp.ones((batch, length), jnp.int32) if segment_ids is None
                      else segment_ids)

        cfg = self.config
        inv_freq = layers.rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                   cfg.rope_scaling_dict)
        rope = layers.rotary_tables(positions, inv_freq, layers.to_dtype(cfg.dtype))
        new_cache = None
        if cfg.scan_layers:
            layer_cache = (cache["key"], cache["value"]) if cache is not None else None
            hidden, stacked = self.layers(hidden, rope, attend, cache_index, layer_cache)
            if cache is not None:
                new_cache = {"key": stacked[0], "value": stacked[1]}
        else:
            keys, values = [], []
            for i, layer in enumerate(self.layer_list):
                layer_cache = (cache["key"][i], cache["value"][i]) if cache is not None else None
                hidden, updated = layer(hidden, rope, attend, cache_index, layer_cache)
                if cache is not None:
                    keys.append(updated[0])
                    values.append(updated[1])
            if cache is not None:
                new_cache = {"key": keys, "value": values}
        # Batch-sharded like the logits that follow, so XLA splits the LM head by rows.
        hidden = nn.with_logical_constraint(self.norm(hidden), ("batch", "length", "embed"))
        logits = self.logits(hidden) if compute_logits else None
        return DecoderOutput(logits=logits, hidden_states=hidden if return_hidden else None,
                             cache=new_cache)
