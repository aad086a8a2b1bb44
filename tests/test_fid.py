"""FID Inception against a torch re-implementation of pytorch-fid's network (written here
from pytorch-fid's architecture: torchvision's Inception-v3 units with the FID pooling
patches; pytorch_fid itself needs torchvision, which is not installed), on random weights
and batch statistics; the Frechet distance against scipy's sqrtm formula in float64."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from metamorph_jax.evaluation import fid


class TorchUnit(nn.Module):
    def __init__(self, cin, cout, kernel=1, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_valid(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class TorchA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = TorchUnit(cin, 64)
        self.branch5x5_1, self.branch5x5_2 = TorchUnit(cin, 48), TorchUnit(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = TorchUnit(cin, 64)
        self.branch3x3dbl_2 = TorchUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchUnit(96, 96, 3, padding=1)
        self.branch_pool = TorchUnit(cin, pool)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_valid(x))], 1)


class TorchB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchUnit(cin, 384, 3, 2)
        self.branch3x3dbl_1 = TorchUnit(cin, 64)
        self.branch3x3dbl_2 = TorchUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchUnit(96, 96, 3, 2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class TorchC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = TorchUnit(cin, 192)
        self.branch7x7_1, self.branch7x7_2 = TorchUnit(cin, c7), TorchUnit(c7, c7, **row)
        self.branch7x7_3 = TorchUnit(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = TorchUnit(cin, c7), TorchUnit(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = TorchUnit(c7, c7, **row), TorchUnit(c7, c7, **col)
        self.branch7x7dbl_5 = TorchUnit(c7, 192, **row)
        self.branch_pool = TorchUnit(cin, 192)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_valid(x))], 1)


class TorchD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = TorchUnit(cin, 192), TorchUnit(192, 320, 3, 2)
        self.branch7x7x3_1 = TorchUnit(cin, 192)
        self.branch7x7x3_2 = TorchUnit(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchUnit(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchUnit(192, 192, 3, 2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class TorchE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = TorchUnit(cin, 320)
        self.branch3x3_1 = TorchUnit(cin, 384)
        self.branch3x3_2a = TorchUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchUnit(cin, 448)
        self.branch3x3dbl_2 = TorchUnit(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = TorchUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = TorchUnit(cin, 192)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg_valid(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchUnit(3, 32, 3, 2)
        self.Conv2d_2a_3x3 = TorchUnit(32, 32, 3)
        self.Conv2d_2b_3x3 = TorchUnit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = TorchUnit(64, 80)
        self.Conv2d_4a_3x3 = TorchUnit(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TorchA(192, 32), TorchA(256, 64), TorchA(288, 64)
        self.Mixed_6a = TorchB(288)
        self.Mixed_6b, self.Mixed_6c = TorchC(768, 128), TorchC(768, 160)
        self.Mixed_6d, self.Mixed_6e = TorchC(768, 160), TorchC(768, 192)
        self.Mixed_7a = TorchD(768)
        self.Mixed_7b, self.Mixed_7c = TorchE(1280, False), TorchE(2048, True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file, unused for FID

    def forward(self, x):  # x: NCHW in [0, 1]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def random_torch_inception(seed=0):
    torch.manual_seed(seed)
    model = TorchFIDInception().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):  # He-scaled so activations stay O(1) in depth
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2.0 / fan_in) ** 0.5)
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.slow
def test_inception_matches_torch_reference(tmp_path):
    model = random_torch_inception()
    path = tmp_path / "pt_inception.pth"
    torch.save(model.state_dict(), path)
    params = fid.load_weights(path)
    rng = np.random.default_rng(0)
    # an upscale (64x80 -> 299) and a downscale without antialiasing (331 -> 299)
    for shape in ((2, 64, 80, 3), (1, 331, 331, 3)):
        images = rng.uniform(0, 1, shape).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        got = fid.features(params, images)
        assert got.shape == (shape[0], 2048)
        scale = np.abs(expected).max()
        # measured: max error 3.8e-6 at max |feature| 4.3 (float32 on CPU)
        np.testing.assert_allclose(got, expected, atol=2e-5 * scale, rtol=0)
    # image files are read as pytorch-fid reads them: RGB uint8 / 255
    pixels = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255).numpy()
    np.testing.assert_allclose(fid.features(params, paths), expected, atol=2e-5 * np.abs(expected).max(),
                               rtol=0)


def test_resize_matches_torch():
    x = torch.randn(1, 1, 37, 420, dtype=torch.float64)
    expected = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)[0, 0].numpy()
    got = fid.resize_matrix(37, 299) @ x[0, 0].numpy() @ fid.resize_matrix(420, 299).T
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_weights_must_fit():
    model = random_torch_inception()
    state = model.state_dict()
    state.pop("Mixed_7c.branch_pool.bn.running_var")
    with pytest.raises(ValueError, match="1 tensors missing.*Mixed_7c.branch_pool.bn.var"):
        fid.params_from_state_dict(state, "w.pth")
    state = model.state_dict()
    state["Mixed_5b.extra.conv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="w.pth: tensor 'Mixed_5b.extra.conv.weight' has no place"):
        fid.params_from_state_dict(state, "w.pth")


def scipy_frechet(mu1, s1, mu2, s2):  # pytorch-fid's formula
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
    b = rng.normal(0.3, 1.0, size=(400, 64)) @ rng.normal(size=(64, 64))
    mu1, s1 = fid.statistics(a)
    mu2, s2 = fid.statistics(b)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))
