"""images.py against transformers' SigLIP image processor (PIL backend), bad files, frames.

Tolerance: max |diff| <= 1e-6 (observed: 0.0, bit-identical). Both sides run the same PIL bicubic resize on the same
uint8 image and the same float64 rescale, so the results agree to float32 rounding.
(`SiglipImageProcessor` itself is the torchvision backend; torchvision is not a
dependency here, so the test uses `SiglipImageProcessorPil`, the same recipe in PIL.)
"""
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from metamorph_jax.data import images

SIZE = 48
TOL = 1e-6


@pytest.fixture(scope="module")
def processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    return SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})


def reference(processor, pil_image):
    out = processor(pil_image, return_tensors="np")["pixel_values"][0]
    return np.transpose(out, (1, 2, 0))


def check_file(processor, path):
    ours = images.load_image(path, SIZE)
    with Image.open(path) as image:
        image.load()
        theirs = reference(processor, image)
    assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.float32
    assert np.max(np.abs(ours - theirs)) <= TOL


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_photographs_match_siglip_processor(processor, tmp_path, name):
    path = tmp_path / f"{name}.png"
    Image.fromarray(getattr(skimage.data, name)()).save(path)
    check_file(processor, path)


def make_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    made = {}
    made["grey"] = base.convert("L")
    made["grey_alpha"] = base.convert("LA")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)], -1)
    made["rgba"] = Image.fromarray(rgba, "RGBA")
    made["palette"] = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent.info["transparency"] = 3
    made["palette_transparent"] = transparent
    made["cmyk"] = base.convert("CMYK")
    paths = {}
    for name, image in made.items():
        ext = ".jpg" if name == "cmyk" else ".png"
        path = tmp_path / f"{name}{ext}"
        image.save(path)
        paths[name] = path
    return paths


def test_modes_match_siglip_processor(processor, tmp_path):
    paths = make_modes(tmp_path)
    for name, path in paths.items():
        with Image.open(path) as check:
            if name == "palette_transparent":
                assert check.mode == "P" and "transparency" in check.info
            if name == "cmyk":
                assert check.mode == "CMYK"
        check_file(processor, path)


def test_alpha_is_composited_on_white(tmp_path):
    clear = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    path = tmp_path / "clear.png"
    Image.fromarray(clear, "RGBA").save(path)
    assert np.all(images.load_image(path, 8) == 1.0)


def test_bad_files_raise_image_error_naming_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(skimage.data.astronaut()).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    for path, words in [(truncated, "truncated"), (garbage, "not a readable image"),
                        (empty, "empty"), (missing, "does not exist")]:
        with pytest.raises(images.ImageError, match=words) as info:
            images.load_image(path, 16)
        assert str(path) in str(info.value)
        assert info.value.path == str(path)


def write_frames(folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4)).save(os.path.join(folder, name))


def test_sample_frames_by_timestamp(tmp_path):
    # Frames every 0.25 s from 0 to 3.0 s, named in milliseconds, listed out of order.
    names = [f"{ms:06d}ms.png" for ms in range(0, 3001, 250)][::-1]
    write_frames(tmp_path / "clip", names)
    picked = images.sample_frames(tmp_path / "clip", fps=1.0)
    assert [os.path.basename(p) for p in picked] == [
        "000000ms.png", "001000ms.png", "002000ms.png", "003000ms.png"]


def test_sample_frames_by_source_fps(tmp_path):
    write_frames(tmp_path / "clip", [f"frame_{i:04d}.jpg" for i in range(1, 11)])
    # 4 fps source: frame i is at i/4 s; 1 fps picks t=0.25 (first), 1.25, 2.25.
    picked = images.sample_frames(tmp_path / "clip", fps=1.0, source_fps=4.0)
    assert [os.path.basename(p) for p in picked] == [
        "frame_0001.jpg", "frame_0005.jpg", "frame_0009.jpg"]
    # over the whole clip: its first and last frame, not the last 1 fps pick (frame 9)
    two = images.sample_frames(tmp_path / "clip", fps=1.0, source_fps=4.0, max_frames=2)
    assert [os.path.basename(p) for p in two] == ["frame_0001.jpg", "frame_0010.jpg"]


def test_long_clip_is_subsampled_evenly_over_its_whole_length(tmp_path):
    # 4 fps, frames 0..82 at 0 .. 20.5 s: 21 picks at 1 fps, over a budget of 3. Even
    # over the whole clip means targets 0, 10.25, 20.5 s = frames 0, 41, 82 (the 1 fps
    # picks spread evenly would end at 20 s: frames 0, 40, 80).
    write_frames(tmp_path / "clip", [f"frame_{i:04d}.jpg" for i in range(83)])
    picked = images.sample_frames(tmp_path / "clip", fps=1.0, source_fps=4.0, max_frames=3)
    assert [os.path.basename(p) for p in picked] == [
        "frame_0000.jpg", "frame_0041.jpg", "frame_0082.jpg"]
    # frames 0..80 (0 .. 20 s) to 5: every 5 s, exactly the budget
    write_frames(tmp_path / "even", [f"frame_{i:04d}.jpg" for i in range(81)])
    picked = images.sample_frames(tmp_path / "even", fps=1.0, source_fps=4.0, max_frames=5)
    assert [os.path.basename(p) for p in picked] == [
        f"frame_{i:04d}.jpg" for i in (0, 20, 40, 60, 80)]
    # a clip within the budget keeps its 1 fps frames
    assert len(images.sample_frames(tmp_path / "even", fps=1.0, source_fps=4.0,
                                    max_frames=21)) == 21


def test_frame_errors(tmp_path):
    with pytest.raises(images.ImageError, match="does not exist"):
        images.sample_frames(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(images.ImageError, match="no image files"):
        images.sample_frames(tmp_path / "empty")
    write_frames(tmp_path / "plain", ["a.png", "b.png"])
    with pytest.raises(images.ImageError, match="no timestamp"):
        images.sample_frames(tmp_path / "plain")


def test_uint8_path_normalised_later_matches(tmp_path):
    import jax.numpy as jnp
    path = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(path)
    reference = images.load_image(path, SIZE)
    raw = images.load_image(path, SIZE, dtype="uint8")
    assert raw.dtype == np.uint8 and raw.shape == (SIZE, SIZE, 3)
    # float32 on the device vs float64-then-float32 on the host: a few ulp at most
    assert np.max(np.abs(images.normalize(raw) - reference)) <= 1e-6
    assert np.max(np.abs(np.asarray(images.normalize(raw, jnp)) - reference)) <= 1e-6
    with pytest.raises(ValueError, match="uint8"):
        images.load_image(path, SIZE, dtype="float16")


def grey_clip(count=10, side=32):
    # frame i is uniformly grey at 25 * i (mod 256)
    return [np.full((side, side, 3), 25 * i % 256, np.uint8) for i in range(count)]


def test_sample_video_file_at_1fps(tmp_path):
    from metamorph_jax.data.testing import write_test_video
    path = tmp_path / "clip.mp4"
    write_test_video(path, grey_clip(), fps=4)  # frames at 0, 0.25, ..., 2.25 s
    frames = images.sample_frames(path, fps=1.0)
    assert len(frames) == 3 and all(f.dtype == np.uint8 and f.shape == (32, 32, 3) for f in frames)
    # frames 0, 4, 8 (t = 0, 1, 2 s); MPEG-4 is lossy, so compare means within 6 levels
    assert np.allclose([f.mean() for f in frames], [0, 100, 200], atol=6)
    two = images.sample_frames(path, fps=1.0, max_frames=2)   # first and last of the clip
    assert np.allclose([f.mean() for f in two], [0, 225], atol=6)
    assert len(images.sample_frames(path, fps=2.0)) == 5


def test_long_video_file_gives_the_budget_evenly(tmp_path):
    from metamorph_jax.data.testing import write_test_video
    path = tmp_path / "long.mp4"
    write_test_video(path, grey_clip(21, side=16), fps=1)   # 21 s at 1 fps, grey 25 * i % 256
    frames = images.sample_frames(path, fps=1.0, max_frames=5)
    assert len(frames) == 5
    # seconds 0, 5, 10, 15, 20: the first, every fifth and the last
    expected = [25 * i % 256 for i in (0, 5, 10, 15, 20)]
    assert np.allclose([f.mean() for f in frames], expected, atol=6)


def test_bad_video_files(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0\1\2 not a video" * 10)
    with pytest.raises(images.ImageError, match="corrupt or unreadable video") as info:
        images.sample_frames(broken)
    assert str(broken) in str(info.value)
    with pytest.raises(images.ImageError, match="does not exist"):
        images.sample_frames(tmp_path / "missing.mp4")


def test_the_decoders_crop_matches_a_short_side_resize_and_centre_crop(tmp_path):
    """load_image_crop (issue 22 item 6) against transformers' CLIP processor (PIL backend)
    set to the authors' visualiser transform: short side to S with bilinear resampling, the
    centre S x S, mean/std 0.5. (transformers floors the crop offset, torchvision rounds:
    the sizes here leave even margins, where both agree.)"""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                      crop_size={"height": SIZE, "width": SIZE},
                                      resample=Image.Resampling.BILINEAR,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for name in ("astronaut", "coffee", "chelsea"):   # square, landscape, landscape
        image = Image.fromarray(getattr(skimage.data, name)())
        path = tmp_path / f"{name}.png"
        image.save(path)
        ours = images.load_image_crop(path, SIZE)
        theirs = np.transpose(processor(image, return_tensors="np")["pixel_values"][0], (1, 2, 0))
        assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.float32
        assert np.max(np.abs(ours - theirs)) <= TOL, name


def test_the_crop_keeps_the_centre_and_leaves_a_square_of_its_size_alone(tmp_path):
    rng = np.random.default_rng(0)
    # Already S wide: only cropped, the top margin round((S + 3 - S) / 2) = 2 rows
    # (torchvision's CenterCrop offset).
    tall = rng.integers(0, 256, (SIZE + 3, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images.resize_crop_uint8(Image.fromarray(tall), SIZE),
                                  tall[2:2 + SIZE])
    # A square image of the size (the Shapes world's 32 px pictures at 32): unchanged, and
    # the same pixels the SigLIP path gives.
    square = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(square).save(tmp_path / "square.png")
    np.testing.assert_array_equal(images.load_image_crop(tmp_path / "square.png", SIZE),
                                  images.load_image(tmp_path / "square.png", SIZE))
    np.testing.assert_array_equal(images.resize_crop_uint8(Image.fromarray(square), SIZE), square)
