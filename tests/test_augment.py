"""Tests for aot_model.augment: EDM's non-leaky augmentation (method-notes b.6)."""

import math

import pytest
import torch

from aot_model.augment import AUGMENT_DIM, AugmentPipe, apply_affine

# Label columns, in the order of method-notes b.6.
XFLIP, YFLIP, SCALE, ROT_COS, ROT_SIN, ANISO_X, ANISO_Y, SHIFT_X, SHIFT_Y = range(9)
ONLY = dict(xflip=0.0, yflip=0.0, scale=0.0, rotate_frac=0.0, aniso=0.0, translate_frac=0.0)


def _pipe_with_only(transform: str, **kwargs) -> AugmentPipe:
    """A pipe where ``transform`` always fires and every other transform never does."""
    return AugmentPipe(p=1.0, **{**ONLY, transform: 1.0}, **kwargs)


def _blob(n: int, size: int, sx: float, sy: float) -> torch.Tensor:
    """``[n, 1, size, size]`` centred Gaussian blobs with pixel stds ``sx`` (x) and ``sy`` (y)."""
    c = torch.arange(size, dtype=torch.float64) + 0.5 - size / 2
    img = torch.exp(-0.5 * ((c[None, :] / sx) ** 2 + (c[:, None] / sy) ** 2))
    return img.float().expand(n, 1, size, size).clone()


def _moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass ``[n, 2]`` and covariance ``[n, 2, 2]`` in pixels from the image centre."""
    size = images.shape[-1]
    c = torch.arange(size, dtype=torch.float64) + 0.5 - size / 2
    w = images[:, 0].double().clamp_min(0)
    w = w / w.sum(dim=(1, 2), keepdim=True)
    x, y = c[None, None, :], c[None, :, None]
    mx, my = (w * x).sum((1, 2)), (w * y).sum((1, 2))
    dx, dy = x - mx[:, None, None], y - my[:, None, None]
    cxx, cyy, cxy = (w * dx * dx).sum((1, 2)), (w * dy * dy).sum((1, 2)), (w * dx * dy).sum((1, 2))
    cov = torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)
    return torch.stack([mx, my], -1), cov


def test_p_zero_returns_input_and_zero_labels(generator):
    images = torch.randn(8, 3, 16, 16)
    out, labels = AugmentPipe(p=0.0)(images, generator)
    assert torch.equal(out, images)
    assert torch.equal(labels, torch.zeros(8, AUGMENT_DIM))


def test_shapes_and_dtypes(generator):
    images = torch.randn(5, 3, 16, 12, dtype=torch.float64)
    out, labels = AugmentPipe(p=1.0)(images, generator)
    assert out.shape == images.shape and out.dtype == torch.float64
    assert labels.shape == (5, AUGMENT_DIM) and labels.dtype == torch.float64


@pytest.mark.parametrize(
    ("transform", "columns"),
    [
        ("xflip", [XFLIP]),
        ("yflip", [YFLIP]),
        ("scale", [SCALE]),
        ("rotate_frac", [ROT_COS, ROT_SIN]),
        ("aniso", [ANISO_X, ANISO_Y]),
        ("translate_frac", [SHIFT_X, SHIFT_Y]),
    ],
)
def test_each_transform_writes_only_its_own_labels(transform, columns, generator):
    _, labels = _pipe_with_only(transform)(torch.randn(64, 1, 8, 8), generator)
    others = [k for k in range(AUGMENT_DIM) if k not in columns]
    assert torch.equal(labels[:, others], torch.zeros(64, len(others)))
    if transform in ("xflip", "yflip"):
        assert set(labels[:, columns[0]].tolist()) == {0.0, 1.0}  # fired, then a coin flip
    else:
        assert (labels[:, columns].abs().sum(1) > 0).all()


def test_firing_frequencies_and_label_structure():
    """p = 0.12 over 2,000 images: x-flip on half of them, each other transform on ~12 %."""
    generator = torch.Generator().manual_seed(1)
    n = 2000
    images = torch.randn(n, 1, 8, 8)
    out, labels = AugmentPipe()(images, generator)
    fired = {
        "xflip": labels[:, XFLIP] == 1,
        "yflip": labels[:, YFLIP] == 1,
        "scale": labels[:, SCALE] != 0,
        "rotate": labels[:, ROT_SIN] != 0,
        "aniso": labels[:, ANISO_X] != 0,
        "translate": labels[:, SHIFT_X] != 0,
    }
    expected = dict(xflip=0.5, yflip=0.06, scale=0.12, rotate=0.12, aniso=0.12, translate=0.12)
    for name, mask in fired.items():
        q = expected[name]
        assert abs(mask.double().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n), name
    # Flip labels are 0/1; paired labels are zero together; the rotation label is on the circle.
    assert set(labels[:, [XFLIP, YFLIP]].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(labels[:, SHIFT_X] != 0, labels[:, SHIFT_Y] != 0)
    assert torch.equal(labels[:, ROT_COS] != 0, fired["rotate"])
    rot = labels[fired["rotate"]]
    torch.testing.assert_close(
        (rot[:, ROT_COS] + 1) ** 2 + rot[:, ROT_SIN] ** 2, torch.ones(len(rot))
    )
    # Images whose labels are all zero come back untouched.
    untouched = (labels == 0).all(dim=1)
    assert untouched.sum() > 0.2 * n  # expected 0.5 * 0.94 * 0.88**4 = 28 %
    assert torch.equal(out[untouched], images[untouched])
    # Only geometric labels cause resampling: those images differ from any pure flip.
    geometric = (labels[:, SCALE:] != 0).any(dim=1)
    assert not torch.isclose(out[geometric], images[geometric].flip(3)).all(dim=(1, 2, 3)).any()


def test_probability_is_clipped_to_one(generator):
    pipe = AugmentPipe(p=0.5, xflip=0.0, yflip=4.0, scale=0.0, rotate_frac=0.0, aniso=0.0)
    _, labels = pipe(torch.randn(2000, 1, 4, 4), generator)
    assert abs(labels[:, YFLIP].mean().item() - 0.5) < 0.06  # fires always, flips half the time
    assert abs((labels[:, SHIFT_X] != 0).double().mean().item() - 0.5) < 0.06


def test_xflip_alone_is_an_exact_pixel_flip(generator):
    images = torch.randn(400, 3, 8, 8)
    out, labels = AugmentPipe()(images, generator)
    only_xflip = (labels[:, XFLIP] == 1) & (labels[:, YFLIP:] == 0).all(dim=1)
    assert only_xflip.sum() > 100
    assert torch.equal(out[only_xflip], images[only_xflip].flip(3))
    only_yflip = (labels[:, YFLIP] == 1) & (labels[:, [XFLIP, *range(SCALE, 9)]] == 0).all(dim=1)
    assert torch.equal(out[only_yflip], images[only_yflip].flip(2))


def test_seeded_generator_is_deterministic():
    images = torch.randn(32, 3, 8, 8)
    pipe = AugmentPipe(p=0.5)
    out1, lab1 = pipe(images, torch.Generator().manual_seed(7))
    out2, lab2 = pipe(images, torch.Generator().manual_seed(7))
    _, lab3 = pipe(images, torch.Generator().manual_seed(8))
    assert torch.equal(out1, out2) and torch.equal(lab1, lab2)
    assert not torch.equal(lab1, lab3)


@pytest.mark.parametrize(("interpolation", "atol"), [("bilinear", 1e-4), ("bicubic", 0.06)])
def test_translation_moves_the_centre_of_mass_by_the_label(interpolation, atol, generator):
    """Label (z_x, z_y) means a shift of (z_x W, z_y H) * translate_std pixels.

    Bilinear resampling keeps the centroid of a well-sampled blob exactly; PyTorch's bicubic
    kernel (a = -0.75) shifts it by up to ~0.05 px at quarter-pixel offsets.
    """
    pipe = _pipe_with_only("translate_frac", translate_std=0.04, interpolation=interpolation)
    out, labels = pipe(_blob(16, 32, 2.0, 2.0), generator)
    centre, _ = _moments(out)
    expected = labels[:, [SHIFT_X, SHIFT_Y]].double() * 32 * 0.04
    torch.testing.assert_close(centre, expected, atol=atol, rtol=0)


def _variance_gains(pipe: AugmentPipe, generator) -> tuple[torch.Tensor, ...]:
    """Augment 16 round blobs: labels and each image's x and y variance over the input's."""
    blobs = _blob(16, 32, 2.5, 2.5)
    out, labels = pipe(blobs, generator)
    _, cov = _moments(out)
    _, cov_in = _moments(blobs[:1])
    return labels, cov[:, 0, 0] / cov_in[0, 0, 0], cov[:, 1, 1] / cov_in[0, 1, 1]


def test_scale_multiplies_the_blob_width_by_two_to_the_label(generator):
    labels, gain_x, gain_y = _variance_gains(_pipe_with_only("scale"), generator)
    s = torch.exp2(labels[:, SCALE].double() * 0.2)
    torch.testing.assert_close(gain_x, s**2, rtol=0.03, atol=0)
    torch.testing.assert_close(gain_y, s**2, rtol=0.03, atol=0)


def test_rotation_turns_the_blob_axis_by_the_label_angle(generator):
    """The long axis of an elongated blob ends at the angle atan2(sin, cos) (modulo pi)."""
    out, labels = _pipe_with_only("rotate_frac")(_blob(16, 32, 4.0, 1.5), generator)
    _, cov = _moments(out)
    axis = 0.5 * torch.atan2(2 * cov[:, 0, 1], cov[:, 0, 0] - cov[:, 1, 1])
    angle = torch.atan2(labels[:, ROT_SIN], labels[:, ROT_COS] + 1).double()
    diff = torch.remainder(axis - angle + math.pi / 2, math.pi) - math.pi / 2
    assert diff.abs().max() < 0.03


def test_aniso_without_axis_rotation_stretches_x_and_squeezes_y(generator):
    pipe = _pipe_with_only("aniso", aniso_rotate_prob=0.0)
    labels, gain_x, gain_y = _variance_gains(pipe, generator)
    assert torch.equal(labels[:, ANISO_Y], torch.zeros(16))  # axis angle 0: sin term vanishes
    a = torch.exp2(labels[:, ANISO_X].double() * 0.2)
    torch.testing.assert_close(gain_x, a**2, rtol=0.03, atol=0)
    torch.testing.assert_close(gain_y, a**-2, rtol=0.03, atol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_integer_translation_matches_roll_away_from_borders(interpolation):
    images = torch.randn(2, 3, 12, 12)
    shifts = [(2, -1), (-3, 4)]  # (x, y) pixels
    inverse = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    for k, (tx, ty) in enumerate(shifts):
        inverse[k, 0, 2], inverse[k, 1, 2] = -tx, -ty
    out = apply_affine(images, inverse, interpolation=interpolation)
    for k, (tx, ty) in enumerate(shifts):
        rolled = torch.roll(images[k], shifts=(ty, tx), dims=(1, 2))
        inner = (
            slice(None),
            slice(max(ty, 0), 12 + min(ty, 0)),
            slice(max(tx, 0), 12 + min(tx, 0)),
        )
        torch.testing.assert_close(out[k][inner], rolled[inner], atol=1e-5, rtol=0)


def test_quarter_turn_matches_rot90():
    images = torch.randn(2, 3, 9, 9)
    angle = torch.full((2,), math.pi / 2, dtype=torch.float64)
    c, s = angle.cos(), angle.sin()
    inverse = torch.zeros(2, 3, 3, dtype=torch.float64)
    inverse[:, 0, 0], inverse[:, 0, 1], inverse[:, 1, 0], inverse[:, 1, 1] = c, -s, s, c
    inverse[:, 2, 2] = 1
    # Output (x, y) reads input (-y, x): the rotation torch.rot90 makes with k = 1 on (H, W).
    out = apply_affine(images, inverse)
    torch.testing.assert_close(out, torch.rot90(images, 1, dims=(2, 3)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(p=1.5), "p"),
        (dict(scale=-1.0), "scale"),
        (dict(translate_std=math.inf), "translate_std"),
        (dict(rotate_max=2.0), "rotate_max"),
        (dict(interpolation="nearest"), "interpolation"),
    ],
)
def test_bad_settings_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AugmentPipe(**kwargs)


def test_bad_images_raise():
    with pytest.raises(ValueError, match="images"):
        AugmentPipe()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="images"):
        AugmentPipe()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
