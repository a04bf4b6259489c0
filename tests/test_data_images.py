"""Image policy of docs/method.md §13.1: RGB, shorter side → R, centre/random crop, [−1, 1], (h, w), (top, left)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.data.images import crop_box, pil_to_tensor, prepare_image, to_rgb


def test_scaling_to_minus_one_one():
    """u ↦ u/127.5 − 1: 0 → −1, 255 → +1, layout (3, h, w)."""
    im = Image.new("RGB", (2, 1))
    im.putpixel((0, 0), (0, 128, 255))
    im.putpixel((1, 0), (255, 0, 51))
    t = pil_to_tensor(im)
    assert t.shape == (3, 1, 2) and t.dtype == torch.float32
    assert torch.allclose(t[:, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)
    assert torch.allclose(t[:, 0, 1], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]), atol=1e-6)


def test_exact_size_centre_crop_is_identity():
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    p = prepare_image(Image.fromarray(a), 16)
    assert p.original_size == (16, 16) and p.crop_coords == (0, 0)
    assert torch.equal(p.pixels, torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1)


def test_centre_crop_of_landscape_image():
    """40×20 (w×h) at R=10: s = 0.5, resized 20×10, centre crop at (top, left) = (0, 5); the window is the middle
    half of the original, so a left/middle/right colour layout keeps only the middle colour."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = (255, 0, 0)
    a[:, 10:30] = (0, 255, 0)
    a[:, 30:] = (0, 0, 255)
    p = prepare_image(Image.fromarray(a), 10, resample="box")
    assert p.original_size == (20, 40) and p.crop_coords == (0, 5)
    assert p.pixels.shape == (3, 10, 10)
    assert torch.allclose(p.pixels[1], torch.ones(10, 10)) and torch.allclose(p.pixels[0], -torch.ones(10, 10))


def test_crop_box_portrait_and_rounding():
    (top, left), box = crop_box(height=30, width=20, resolution=16)
    # s = 0.8, resized 16 × 24 (w × h): top = (24 − 16) // 2 = 4
    assert (top, left) == (4, 0)
    assert box == pytest.approx((0.0, 5.0, 20.0, 25.0))


def test_random_crop_is_reproducible_and_in_bounds():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 60, 3), dtype=np.uint8))
    a = prepare_image(im, 10, "random", torch.Generator().manual_seed(5))
    b = prepare_image(im, 10, "random", torch.Generator().manual_seed(5))
    assert a.crop_coords == b.crop_coords and torch.equal(a.pixels, b.pixels)
    lefts = {prepare_image(im, 10, "random", torch.Generator().manual_seed(s)).crop_coords for s in range(20)}
    # (t, l) = (top, left) of the crop; the names are kept, so E741 is silenced on this line only
    assert all(t == 0 and 0 <= l <= 20 for t, l in lefts) and len(lefts) > 3  # noqa: E741
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        prepare_image(im, 10, "random", None)


def test_extreme_aspect_ratio_does_not_build_a_huge_intermediate():
    """4000×4 at R=256: resizing the whole image first would make 256×256000; the box resize touches 4×4 pixels."""
    im = Image.new("RGB", (4000, 4), (10, 20, 30))
    p = prepare_image(im, 256)
    assert (
        p.pixels.shape == (3, 256, 256) and p.original_size == (4, 4000) and p.crop_coords == (0, (256000 - 256) // 2)
    )
    assert torch.allclose(p.pixels[:, 0, 0], torch.tensor([10, 20, 30]) / 127.5 - 1)


@pytest.mark.parametrize(
    "mode, make, expected_rgb",
    [
        ("L", lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
        ("1", lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
        ("P", lambda: Image.new("RGB", (2, 2), (9, 99, 199)).convert("P", palette=Image.Palette.ADAPTIVE),
         (9, 99, 199)),
        ("CMYK", lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
        ("RGBA transparent over white", lambda: Image.new("RGBA", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
        ("RGBA opaque", lambda: Image.new("RGBA", (2, 2), (1, 2, 3, 255)), (1, 2, 3)),
        ("LA half", lambda: Image.new("LA", (2, 2), (0, 128)), (127, 127, 127)),
        ("I;16 65535", lambda: Image.fromarray(np.full((2, 2), 65535, np.uint16)), (255, 255, 255)),
        ("I;16 257·100", lambda: Image.fromarray(np.full((2, 2), 25700, np.uint16)), (100, 100, 100)),
        ("I 16-bit range", lambda: Image.fromarray(np.full((2, 2), 257 * 40, np.int32)), (40, 40, 40)),
        ("I 8-bit range", lambda: Image.fromarray(np.full((2, 2), 40, np.int32)), (40, 40, 40)),
        ("F in [0,1]", lambda: Image.fromarray(np.full((2, 2), 0.5, np.float32)), (128, 128, 128)),
    ],
)
def test_modes_convert_to_rgb(mode, make, expected_rgb):
    im = make()
    out = to_rgb(im)
    assert out.mode == "RGB"
    got = out.getpixel((0, 0))
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected_rgb)), (mode, im.mode, got)


def test_sixteen_bit_gradient_is_scaled_not_clipped():
    """PIL's own I;16 → L conversion clips everything above 255 to white; ours keeps the ramp."""
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    im = Image.fromarray(ramp)
    assert im.mode == "I;16"
    out = np.asarray(to_rgb(im))[..., 0]
    assert np.array_equal(out, np.arange(256).reshape(16, 16))
