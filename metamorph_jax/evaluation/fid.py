"""FID: the Inception-v3 pool features pytorch-fid uses, in Flax, and the Frechet distance.

The network is TensorFlow's 2015-12-05 Inception graph as pytorch-fid rebuilds it: the
torchvision Inception-v3 layout (conv + batch norm (eps 1e-3) + ReLU units, no conv bias)
with the FID patches: the pooling branch of the A, C and first E blocks averages over
valid (unpadded) pixels only, and the last E block max-pools instead. Features are the
2048-d output of the final global average pool. Inputs are RGB in [0, 1], resized to
299x299 bilinearly (half-pixel centres, no antialiasing: torch's F.interpolate default)
and scaled to [-1, 1].

Weights: pytorch-fid's `pt_inception-2015-12-05-*.pth` (a torch state dict), read with
torch.load(weights_only=True) and converted by name (`conv.weight` OIHW -> HWIO kernel;
`bn.{weight, bias, running_mean, running_var}` -> {scale, bias, mean, var}); the 1008-way
classifier is not used. Statistics and the distance are in float64:
d = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), with tr(sqrt(S1 S2)) taken from
the eigenvalues of the symmetric sqrt(S1) S2 sqrt(S1).
"""
from __future__ import annotations

import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metamorph_jax.input_errors import BadInput

FEATURES = 2048
SIZE = 299
BN_EPS = 1e-3


class BatchNorm(nn.Module):
    """Inference-mode batch norm with its running statistics stored as params."""
    features: int

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class Unit(nn.Module):
    """conv (no bias) -> batch norm -> ReLU (torchvision's BasicConv2d)."""
    features: int
    kernel: Sequence[int] = (1, 1)
    strides: Sequence[int] = (1, 1)
    padding: Sequence[int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        pad = [(p, p) for p in self.padding]
        x = nn.Conv(self.features, tuple(self.kernel), tuple(self.strides), padding=pad,
                    use_bias=False, name="conv")(x)
        return nn.relu(BatchNorm(self.features, name="bn")(x))


def _avg_pool_valid(x):  # TensorFlow's average pool: padded zeros are not counted
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_down(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class BlockA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = Unit(64, name="branch1x1")(x)
        b5 = Unit(64, (5, 5), padding=(2, 2), name="branch5x5_2")(Unit(48, name="branch5x5_1")(x))
        b3 = Unit(64, name="branch3x3dbl_1")(x)
        b3 = Unit(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = Unit(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = Unit(self.pool_features, name="branch_pool")(_avg_pool_valid(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class BlockB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = Unit(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = Unit(64, name="branch3x3dbl_1")(x)
        bd = Unit(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = Unit(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_down(x)], -1)


class BlockC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = Unit(192, name="branch1x1")(x)
        b7 = Unit(c, name="branch7x7_1")(x)
        b7 = Unit(c, **row, name="branch7x7_2")(b7)
        b7 = Unit(192, **col, name="branch7x7_3")(b7)
        bd = Unit(c, name="branch7x7dbl_1")(x)
        bd = Unit(c, **col, name="branch7x7dbl_2")(bd)
        bd = Unit(c, **row, name="branch7x7dbl_3")(bd)
        bd = Unit(c, **col, name="branch7x7dbl_4")(bd)
        bd = Unit(192, **row, name="branch7x7dbl_5")(bd)
        bp = Unit(192, name="branch_pool")(_avg_pool_valid(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class BlockD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = Unit(320, (3, 3), (2, 2), name="branch3x3_2")(Unit(192, name="branch3x3_1")(x))
        b7 = Unit(192, name="branch7x7x3_1")(x)
        b7 = Unit(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = Unit(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = Unit(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_down(x)], -1)


class BlockE(nn.Module):
    max_pool: bool  # the last block of the FID graph max-pools its pooling branch

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = Unit(320, name="branch1x1")(x)
        b3 = Unit(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([Unit(384, **row, name="branch3x3_2a")(b3),
                              Unit(384, **col, name="branch3x3_2b")(b3)], -1)
        bd = Unit(448, name="branch3x3dbl_1")(x)
        bd = Unit(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([Unit(384, **row, name="branch3x3dbl_3a")(bd),
                              Unit(384, **col, name="branch3x3dbl_3b")(bd)], -1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_valid(x)
        bp = Unit(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of torch's bilinear resize (align_corners=False, no
    antialiasing): source = (out + 0.5) * in / out - 0.5, clamped below at 0."""
    weights = np.zeros((size_out, size_in), np.float64)
    for out in range(size_out):
        source = max((out + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(int(np.floor(source)), size_in - 1)
        high = min(low + 1, size_in - 1)
        frac = source - low
        weights[out, low] += 1.0 - frac
        weights[out, high] += frac
    return weights


class InceptionV3FID(nn.Module):
    """[N, H, W, 3] RGB in [0, 1] -> [N, 2048] pool features."""

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32)
        n, height, width, _ = x.shape
        if (height, width) != (SIZE, SIZE):
            rows = jnp.asarray(resize_matrix(height, SIZE), jnp.float32)
            cols = jnp.asarray(resize_matrix(width, SIZE), jnp.float32)
            x = jnp.einsum("oh,nhwc->nowc", rows, x, precision="highest")
            x = jnp.einsum("pw,nowc->nopc", cols, x, precision="highest")
        x = 2.0 * x - 1.0
        x = Unit(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = Unit(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = Unit(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_down(x)
        x = Unit(80, name="Conv2d_3b_1x1")(x)
        x = Unit(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_down(x)
        x = BlockA(32, name="Mixed_5b")(x)
        x = BlockA(64, name="Mixed_5c")(x)
        x = BlockA(64, name="Mixed_5d")(x)
        x = BlockB(name="Mixed_6a")(x)
        for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = BlockC(channels, name=name)(x)
        x = BlockD(name="Mixed_7a")(x)
        x = BlockE(False, name="Mixed_7b")(x)
        x = BlockE(True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# --- weights -------------------------------------------------------------------------------

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_UNUSED_PREFIXES = ("fc.", "AuxLogits.")


def params_from_state_dict(state_dict: dict, source: str = "state dict") -> dict:
    """pytorch-fid's Inception state dict -> this module's params (every leaf checked)."""
    expected = jax.eval_shape(lambda: InceptionV3FID().init(
        jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))["params"]
    flat_expected = {tuple(k.key for k in path): leaf
                     for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    params: dict = {}
    for key, tensor in state_dict.items():
        if key.startswith(_UNUSED_PREFIXES) or key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if len(parts) < 3 or parts[-2] not in ("conv", "bn"):
            raise BadInput(f"{source}: unexpected tensor {key!r} (not a pytorch-fid Inception)")
        value = np.asarray(tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor,
                           np.float32)
        leaf = "kernel" if parts[-2] == "conv" else _BN_NAMES.get(parts[-1])
        if tuple(parts[:-1]) + (leaf,) not in flat_expected:
            raise BadInput(f"{source}: tensor {key!r} has no place in the FID Inception")
        if parts[-2] == "conv":
            if parts[-1] != "weight":
                raise BadInput(f"{source}: unexpected tensor {key!r}")
            if value.ndim != 4:
                raise BadInput(f"{source}: {key!r} is not a 4-d conv weight ({value.shape})")
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        else:
            if parts[-1] not in _BN_NAMES:
                raise BadInput(f"{source}: unexpected tensor {key!r}")
            leaf = _BN_NAMES[parts[-1]]
        path = tuple(parts[:-1]) + (leaf,)
        if path not in flat_expected:
            raise BadInput(f"{source}: tensor {key!r} has no place in the FID Inception")
        if value.shape != flat_expected[path].shape:
            raise BadInput(f"{source}: {key!r} has shape {value.shape}, expected "
                           f"{flat_expected[path].shape}")
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    missing = [".".join(p) for p in flat_expected
               if _get(params, p) is None]
    if missing:
        raise BadInput(f"{source}: {len(missing)} tensors missing (first: {missing[:3]})")
    return params


def _get(tree, path):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def load_weights(path) -> dict:
    """Params from pytorch-fid's `pt_inception-2015-12-05-*.pth` (torch state dict)."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} do not exist")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise BadInput(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    return params_from_state_dict(state_dict, path)


# --- features, statistics, distance --------------------------------------------------------

@jax.jit
def _forward(params, images):
    return InceptionV3FID().apply({"params": params}, images)


def load_rgb01(path) -> np.ndarray:
    """An image file as pytorch-fid reads it: RGB (PIL convert), float32 in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.float32) / 255.0


def features(params, images, batch_size: int = 50) -> np.ndarray:
    """Pool features [N, 2048] (float64) of images: an array [N, H, W, 3] in [0, 1] or
    uint8, or a list of image paths (each read as pytorch-fid reads them). Each distinct
    image size compiles the network once: give images of one size (as FID protocols
    prepare them, e.g. COCO resized and centre-cropped) for a fast run."""
    out = []
    rows = min(batch_size, len(images))
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if isinstance(chunk, np.ndarray):
            batch = chunk.astype(np.float32) / 255.0 if chunk.dtype == np.uint8 else chunk
        else:
            arrays = [load_rgb01(p) for p in chunk]
            if len({a.shape for a in arrays}) > 1:  # different sizes: one at a time
                out += [np.asarray(_forward(params, a[None]), np.float64) for a in arrays]
                continue
            batch = np.stack(arrays)
        # a shorter last chunk is padded to the first's rows: one compile, not two
        padded = np.concatenate([batch, np.zeros((rows - len(batch),) + batch.shape[1:],
                                                 batch.dtype)])
        out.append(np.asarray(_forward(params, jnp.asarray(padded)), np.float64)[:len(batch)])
    return np.concatenate(out) if out else np.zeros((0, FEATURES))


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float64)
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(feats)}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def fid(params, real_images, generated_images, batch_size: int = 50) -> float:
    """FID between two image sets (arrays or lists of paths, see `features`)."""
    arrays = [isinstance(images, np.ndarray) for images in (real_images, generated_images)]
    if not any(arrays):   # both sets in one pass: their batches share one shape
        both = features(params, list(real_images) + list(generated_images), batch_size)
        real, generated = both[:len(real_images)], both[len(real_images):]
    else:
        real = features(params, real_images, batch_size)
        generated = features(params, generated_images, batch_size)
    mu1, s1 = statistics(real)
    mu2, s2 = statistics(generated)
    return frechet_distance(mu1, s1, mu2, s2)
