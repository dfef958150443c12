"""Tests for aot_model.augment: EDM's non-leaky augmentation (method-notes b.6)."""

import math

import numpy as np
import pytest
import torch

from aot_model.augment import AUGMENT_DIM, MULTIPLIERS, SYM6, AugmentDraw, AugmentPipe, apply_affine

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


def test_translation_moves_the_centre_of_mass_by_the_label(generator):
    """Label (z_x, z_y) means a shift of (z_x W, z_y H) * translate_std pixels, right and down."""
    pipe = _pipe_with_only("translate_frac", translate_std=0.04)
    out, labels = pipe(_blob(16, 32, 2.0, 2.0), generator)
    centre, _ = _moments(out)
    expected = labels[:, [SHIFT_X, SHIFT_Y]].double() * 32 * 0.04
    torch.testing.assert_close(centre, expected, atol=2e-3, rtol=0)


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


def _axis_angle_on_screen(images: torch.Tensor) -> torch.Tensor:
    """Angle of each blob's long axis, counter-clockwise on screen (y up), modulo pi."""
    _, cov = _moments(images)
    return 0.5 * torch.atan2(-2 * cov[:, 0, 1], cov[:, 0, 0] - cov[:, 1, 1])


def _angle_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| modulo pi, in [0, pi/2]."""
    return (torch.remainder(a - b + math.pi / 2, math.pi) - math.pi / 2).abs()


def test_rotation_turns_the_blob_counter_clockwise_by_the_label_angle(generator):
    """EDM's convention: label (cos a - 1, sin a) turns the content by a counter-clockwise on
    screen, so a blob long along x ends long along angle a (modulo pi)."""
    out, labels = _pipe_with_only("rotate_frac")(_blob(16, 32, 4.0, 1.5), generator)
    angle = torch.atan2(labels[:, ROT_SIN], labels[:, ROT_COS] + 1).double()
    assert _angle_gap(_axis_angle_on_screen(out), angle).max() < 0.03


def _draw(n: int, **values) -> AugmentDraw:
    """A hand-made draw of ``n`` images: the given parameters, everything else zero."""
    zero = dict(
        xflip=torch.zeros(n, dtype=torch.bool), yflip=torch.zeros(n, dtype=torch.bool),
        scale=torch.zeros(n, dtype=torch.float64), angle=torch.zeros(n, dtype=torch.float64),
        aniso=torch.zeros(n, dtype=torch.float64), aniso_axis=torch.zeros(n, dtype=torch.float64),
        shift=torch.zeros(n, 2, dtype=torch.float64),
    )  # fmt: skip
    given = {k: torch.as_tensor(v, dtype=zero[k].dtype) for k, v in values.items()}
    return AugmentDraw(**{**zero, **given})


@pytest.mark.parametrize("shift", [[0.25, 0.0], [0.0, 0.25]])
def test_a_shift_along_one_axis_alone_moves_the_image(shift):
    """An image whose only transform is a shift in x (or y) is resampled, not left as it is."""
    images = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    out, _ = AugmentPipe(translate_std=1.0).apply(images, _draw(1, shift=[shift]))
    assert not torch.allclose(out, images)


def test_aniso_stretches_along_the_label_axis():
    """EDM's convention: z and axis r stretch by 2^(z aniso_std) along the axis at angle r
    counter-clockwise on screen (z > 0: the long axis; z < 0: across it)."""
    axis = torch.tensor([0.3, 1.2, -0.8, 2.5, 0.3, -1.4], dtype=torch.float64)
    z = torch.tensor([1.5, 1.5, 1.5, 1.5, -1.5, -1.5], dtype=torch.float64)
    # Mild stretches: stronger squeezes would read past the reflect padding's mirrored blobs.
    out, labels = AugmentPipe(aniso_std=0.2).apply(
        _blob(6, 32, 2.0, 2.0), _draw(6, aniso=z, aniso_axis=axis)
    )
    long_axis = torch.where(z > 0, axis, axis + math.pi / 2)
    assert _angle_gap(_axis_angle_on_screen(out), long_axis).max() < 0.01
    torch.testing.assert_close(labels[:, ANISO_X].double(), z * axis.cos(), rtol=1e-6, atol=0)
    torch.testing.assert_close(labels[:, ANISO_Y].double(), z * axis.sin(), rtol=1e-6, atol=0)


def test_aniso_without_axis_rotation_stretches_x_and_squeezes_y(generator):
    pipe = _pipe_with_only("aniso", aniso_rotate_prob=0.0)
    labels, gain_x, gain_y = _variance_gains(pipe, generator)
    assert torch.equal(labels[:, ANISO_Y], torch.zeros(16))  # axis angle 0: sin term vanishes
    a = torch.exp2(labels[:, ANISO_X].double() * 0.2)
    torch.testing.assert_close(gain_x, a**2, rtol=0.03, atol=0)
    torch.testing.assert_close(gain_y, a**-2, rtol=0.03, atol=0)


def test_identity_map_returns_the_image():
    """The sym6 filter is orthonormal: upsampling then decimating reproduces the pixels."""
    images = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    out = apply_affine(images, torch.eye(3, dtype=torch.float64).repeat(2, 1, 1))
    torch.testing.assert_close(out, images, atol=1e-10, rtol=0)


def test_sym6_is_an_orthonormal_low_pass_filter():
    h = np.array(SYM6)
    assert h.sum() == pytest.approx(math.sqrt(2), abs=1e-12)
    shifted = [np.dot(h[: len(h) - 2 * m], h[2 * m :]) for m in range(len(h) // 2)]
    np.testing.assert_allclose(shifted, np.eye(1, len(h) // 2)[0], atol=1e-11)


def test_integer_translation_matches_roll_away_from_borders():
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    shifts = [(2, -1), (-3, 4)]  # (x, y) pixels
    inverse = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    for k, (tx, ty) in enumerate(shifts):
        inverse[k, 0, 2], inverse[k, 1, 2] = -tx, -ty
    out = apply_affine(images, inverse)
    for k, (tx, ty) in enumerate(shifts):
        rolled = torch.roll(images[k], shifts=(ty, tx), dims=(1, 2))
        inner = (
            slice(None),
            slice(max(ty, 0), 12 + min(ty, 0)),
            slice(max(tx, 0), 12 + min(tx, 0)),
        )
        torch.testing.assert_close(out[k][inner], rolled[inner], atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------
# A fixed parameter draw replayed against a float64 reference written from the formulas of
# method-notes b.6 (forward map T A R S with counter-clockwise angles; EDM's wavelet resampling).

FIXED_DRAW = dict(  # image 0: scale + rotation; 1: stretch + shift; 2: everything; 3: flip only
    xflip=[False, False, True, True],
    yflip=[False, True, True, False],
    scale=[0.8, 0.0, -1.1, 0.0],
    angle=[0.7, 0.0, -2.3, 0.0],
    aniso=[0.0, -1.3, 0.9, 0.0],
    aniso_axis=[0.0, 0.4, 2.0, 0.0],
    shift=[[0.0, 0.0], [0.3, -0.6], [-0.2, 0.45], [0.0, 0.0]],
)


def _forward_map(pipe, d, k, h, w):
    """3x3 forward map of image k, from the definitions: scale, then rotate counter-clockwise,
    then stretch along the axis, then shift; pixels from the centre, y down."""
    s = 2 ** (d["scale"][k] * pipe.scale_std)
    a, r = d["angle"][k], d["aniso_axis"][k]
    rotate = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    u = np.array([math.cos(r), -math.sin(r)])  # the axis on screen, y down
    v = np.array([u[1], -u[0]])
    g = 2 ** (d["aniso"][k] * pipe.aniso_std)
    stretch = g * np.outer(u, u) + np.outer(v, v) / g
    m = np.eye(3)
    m[:2, :2] = stretch @ rotate * s
    m[:2, 2] = np.array(d["shift"][k]) * [w * pipe.translate_std, h * pipe.translate_std]
    return m


def _filter_matrix(rows: int, cols: int, offset: int) -> np.ndarray:
    """M[a, b] = h[b - 2a + offset] (decimation); its transpose upsamples."""
    h, m = np.array(SYM6), np.zeros((rows, cols))
    for a in range(rows):
        for b in range(cols):
            if 0 <= b - 2 * a + offset < len(h):
                m[a, b] = h[b - 2 * a + offset]
    return m


def _bilinear_zero_outside(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """image [C, H, W] read at pixel-index positions x, y (arrays of one shape); 0 outside."""
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    out = np.zeros((image.shape[0], *x.shape))
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - np.abs(x - xi)) * (1 - np.abs(y - yi))
            inside = (xi >= 0) & (xi < image.shape[2]) & (yi >= 0) & (yi < image.shape[1])
            out += np.where(inside, weight, 0) * image[:, yi.clip(0, image.shape[1] - 1),
                                                       xi.clip(0, image.shape[2] - 1)]  # fmt: skip
    return out


def _reference_resample(images: np.ndarray, inverses: list[np.ndarray]) -> np.ndarray:
    """EDM's resampling of each image [C, H, W] through its output-to-input map."""
    h, w = images.shape[2:]
    reach = len(SYM6) // 4
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = np.array([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]])
    mapped = np.concatenate([(m @ corners)[:2] for m in inverses], axis=1)
    low = np.minimum(np.maximum(-mapped.min(1) + 2 * reach - [cx, cy], 0), [w - 1, h - 1])
    high = np.minimum(np.maximum(mapped.max(1) + 2 * reach - [cx, cy], 0), [w - 1, h - 1])
    (left, top), (right, bottom) = np.ceil(low).astype(int), np.ceil(high).astype(int)
    out_h, out_w = 2 * (h + 2 * reach), 2 * (w + 2 * reach)
    result = []
    for image, m in zip(images, inverses, strict=True):
        padded = np.pad(image, ((0, 0), (top, bottom), (left, right)), mode="reflect")
        ph, pw = padded.shape[1:]
        # u[j] = sum_i x[i] h[j + 5 - 2i]: sample 2i of the 2x image lies on input pixel i.
        up = np.einsum("ai,cij,bj->cab", _filter_matrix(ph, 2 * ph, 5).T, padded,
                       _filter_matrix(pw, 2 * pw, 5).T)  # fmt: skip
        # Output sample (a, b) of the 2x grid lies at (b - 0.5) / 2 - reach output pixels from
        # the output's pixel 0; map it, then find it in the 2x padded input.
        b, a = np.meshgrid(np.arange(out_w), np.arange(out_h))
        qx, qy = (b + 0.5) / 2 - reach - 0.25 - cx, (a + 0.5) / 2 - reach - 0.25 - cy
        px = m[0, 0] * qx + m[0, 1] * qy + m[0, 2] + cx + left
        py = m[1, 0] * qx + m[1, 1] * qy + m[1, 2] + cy + top
        warped = _bilinear_zero_outside(up, 2 * px, 2 * py)
        down = np.einsum("ai,cij,bj->cab", _filter_matrix(out_h // 2, out_h, 5), warped,
                         _filter_matrix(out_w // 2, out_w, 5))  # fmt: skip
        result.append(down[:, reach:-reach, reach:-reach])
    return np.stack(result)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fixed_draw_matches_the_reference_pipe(dtype, atol):
    pipe = AugmentPipe()
    h, w = 16, 14
    images = torch.tanh(2 * torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(3)))
    draw = _draw(4, **FIXED_DRAW)
    out, labels = pipe.apply(images.to(dtype), draw)

    d = FIXED_DRAW
    flipped = images.double().numpy().copy()
    for k in range(4):
        flipped[k] = flipped[k][:, :: -1 if d["yflip"][k] else 1, :: -1 if d["xflip"][k] else 1]
    geometric = [0, 1, 2]
    inverses = [np.linalg.inv(_forward_map(pipe, d, k, h, w)) for k in geometric]
    expected = flipped.copy()
    expected[geometric] = _reference_resample(flipped[geometric], inverses)
    np.testing.assert_allclose(out.double().numpy(), expected, atol=atol, rtol=0)

    a, z, r = np.array(d["angle"]), np.array(d["aniso"]), np.array(d["aniso_axis"])
    expected_labels = np.column_stack(
        [d["xflip"], d["yflip"], d["scale"], np.cos(a) - 1, np.sin(a), z * np.cos(r),
         z * np.sin(r), *np.array(d["shift"]).T]
    )  # fmt: skip
    np.testing.assert_allclose(labels.double().numpy(), expected_labels, atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(p=1.5), "p"),
        (dict(scale=-1.0), "scale"),
        (dict(translate_std=math.inf), "translate_std"),
        (dict(rotate_max=2.0), "rotate_max"),
        *((dict.fromkeys([name], -1.0), name) for name in MULTIPLIERS),
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
