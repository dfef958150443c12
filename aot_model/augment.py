"""EDM's non-leaky geometric augmentation (Karras et al. 2022, appendix; method-notes b.6).

Every training image may be flipped, scaled, rotated, stretched and shifted; the network is told
what was done through a 9-dim augmentation label and sees zeros at sampling time, so the
augmentations do not leak into generated images. CIFAR-10 settings (EDM ``train.py``):
``p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1``.

Each transform fires independently per image with probability ``min(1, p * multiplier)``; with
``xflip=1e8`` the x-flip is always eligible and then flips with probability 0.5. The parameter
distributions, label encoding and sign conventions are EDM's ``augment.py`` (positions in pixels
from the image centre, x right and y down; a positive angle turns counter-clockwise on screen):

========  =====================================================  =================================
index     transform and distribution                             label when it fired (else 0)
========  =====================================================  =================================
0         x-flip: coin flip                                      1 if flipped, else 0
1         y-flip: coin flip                                      1 if flipped, else 0
2         isotropic scale ``s = 2 ** (z * scale_std)``,          ``z ~ N(0, 1)``
          ``z ~ N(0, 1)``
3, 4      rotation of the content by ``a ~ U(-pi, pi) *          ``cos(a) - 1``, ``sin(a)``
          rotate_max``, counter-clockwise on screen
5, 6      stretch by ``2 ** (z * aniso_std)`` along the axis at  ``z cos(r)``, ``z sin(r)``
          angle ``r`` (counter-clockwise from x) and its
          inverse across it; ``r ~ U(-pi, pi)`` with
          probability ``aniso_rotate_prob``, else 0
7, 8      translation by ``(z_x W, z_y H) * translate_std``      ``z_x``, ``z_y``
          pixels (right, down), ``z ~ N(0, 1)``
========  =====================================================  =================================

As in EDM, the aniso label ``z (cos r, sin r)`` does not distinguish ``(z, r)`` from
``(-z, r + pi)``, which are different stretches; we keep EDM's encoding for parity.

The flips are exact pixel flips, applied first. Scale, rotation, stretch and translation are
composed into one affine map per image (forward ``T A R S``: scale first, translate last, about the
image centre) and resampled as EDM does (method-notes b.6): reflect-pad by the transformed
corners' reach plus the filter support, upsample 2x with the sym6 wavelet low-pass filter, sample
bilinearly (zeros outside), low-pass with the same filter and decimate 2x, crop. For the same
parameters this equals EDM's pipe to float rounding (tests/test_augment.py replays a fixed draw
against a float64 reference written from these formulas). One deliberate difference: images on
which no geometric transform fired skip the resampler (EDM passes them through it, which returns
them unchanged up to float rounding because the sym6 filter is orthonormal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9
# The transforms' probability multipliers, in label order.
MULTIPLIERS = ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac")

# Low-pass decomposition filter of the Daubechies symlet with 6 vanishing moments ("sym6", as in
# PyWavelets), EDM's resampling filter. Orthonormal: sum = sqrt(2), sum_k h[k] h[k + 2m] = delta_m.
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)  # fmt: skip
# The filters reach this many input pixels to each side (EDM's ``Hz_pad``).
FILTER_REACH = len(SYM6) // 4


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` matrices ``[[cos, -sin], [sin, cos]]`` of ``angle`` in homogeneous 2-D
    coordinates (x right, y down: a positive angle turns clockwise on screen)."""
    c, s = angle.cos(), angle.sin()
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` axis-aligned scalings."""
    return torch.diag_embed(torch.stack([sx, sy, torch.ones_like(sx)], -1))


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` translations."""
    m = torch.eye(3, dtype=tx.dtype, device=tx.device).repeat(len(tx), 1, 1)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _diagonal(x: float, y: float) -> torch.Tensor:
    """``[3, 3]`` float64 scaling of x by ``x`` and y by ``y``."""
    return torch.diag(torch.tensor([x, y, 1.0], dtype=torch.float64))


def _resample2x(images: torch.Tensor, taps: torch.Tensor, *, up: bool) -> torch.Tensor:
    """Separable 2x resampling with the filter ``h`` = ``taps`` along each axis (zero outside).

    ``up``: ``[N, C, 2H, 2W]``, ``u[j] = sum_i x[i] h[j + 5 - 2i]``; else ``[N, C, H/2, W/2]``,
    ``d[q] = sum_j v[j] h[j + 5 - 2q]`` (the transpose).
    """
    c = images.shape[1]
    pad = len(SYM6) // 2 - 1
    conv = F.conv_transpose2d if up else F.conv2d
    along_w = taps.reshape(1, 1, 1, -1).expand(c, 1, 1, -1)
    along_h = taps.reshape(1, 1, -1, 1).expand(c, 1, -1, 1)
    out = conv(images, along_w, stride=(1, 2), padding=(0, pad), groups=c)
    return conv(out, along_h, stride=(2, 1), padding=(pad, 0), groups=c)


def apply_affine(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Resample float ``images`` ``[N, C, H, W]`` through affine maps with EDM's wavelet scheme.

    ``inverse`` ``[N, 3, 3]`` maps output to input positions, in pixels from the image centre
    (x right, y down): output pixel ``q`` takes the input value at ``inverse @ q``. The identity
    and integer translations reproduce the (shifted) pixels up to float rounding away from the
    borders, since the sym6 filter is orthonormal.
    """
    n, _, h, w = images.shape
    if inverse.shape != (n, 3, 3):
        raise ValueError(f"inverse must have shape ({n}, 3, 3), got {tuple(inverse.shape)}")
    inverse = inverse.to("cpu", torch.float64)
    # Reflect padding that covers where the batch's output corners read from, plus twice the
    # filter reach; at most w - 1 / h - 1 (the reflect limit).
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0] * 4], dtype=torch.float64)
    reach = (inverse @ corners)[:, :2].transpose(0, 1).flatten(1)  # [xy, N * 4]
    extent = torch.stack([(-reach).amax(1), reach.amax(1)]) + 2 * FILTER_REACH  # [low/high, xy]
    centre = torch.tensor([cx, cy], dtype=torch.float64)
    pads = (extent - centre).clamp(min=0).minimum(2 * centre).ceil()
    (left, top), (right, bottom) = pads.int().tolist()
    padded = F.pad(images, [left, right, top, bottom], mode="reflect")
    # Positions from the padded image's centre, then in the upsampled images: the upsampled
    # sample 2i sits on input pixel i (tap 5 of the filter, its centroid 5.1 rounded, as in EDM),
    # so centred coordinates scale by 2 about a point half an upsampled pixel off the centre.
    to_padded = _translation(*torch.tensor([[(left - right) / 2], [(top - bottom) / 2]]).double())
    half = _translation(*torch.full((2, 1), -0.5, dtype=torch.float64))
    upsampled = half @ _diagonal(2.0, 2.0) @ to_padded @ inverse
    upsampled = upsampled @ _diagonal(0.5, 0.5) @ torch.linalg.inv(half)
    taps = torch.tensor(SYM6, dtype=images.dtype, device=images.device)
    source = _resample2x(padded, taps, up=True)
    out_h, out_w = 2 * (h + 2 * FILTER_REACH), 2 * (w + 2 * FILTER_REACH)
    # affine_grid works in [-1, 1] coordinates spanning the pixel edges (align_corners=False).
    theta = _diagonal(2 / source.shape[3], 2 / source.shape[2]) @ upsampled
    theta = theta @ _diagonal(out_w / 2, out_h / 2)
    grid = F.affine_grid(theta[:, :2], [n, 1, out_h, out_w], align_corners=False)
    grid = grid.to(device=images.device, dtype=images.dtype)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    r = FILTER_REACH
    return _resample2x(warped, taps, up=False)[:, :, r:-r, r:-r]


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of one augmented batch (zeros where a transform did not fire)."""

    xflip: torch.Tensor  # [N] bool: whether each image is flipped
    yflip: torch.Tensor
    scale: torch.Tensor  # [N] float64 standard-normal draw z of the isotropic scaling
    angle: torch.Tensor  # [N] float64 rotation angle, radians, counter-clockwise
    aniso: torch.Tensor  # [N] float64 standard-normal draw z of the anisotropic stretch
    aniso_axis: torch.Tensor  # [N] float64 stretch-axis angle, radians, counter-clockwise
    shift: torch.Tensor  # [N, 2] float64 standard-normal translation draws (x, y)

    def labels(self) -> torch.Tensor:
        """``[N, 9]`` float64 augmentation labels in EDM's encoding (module docstring)."""
        columns = [
            self.xflip.double(),
            self.yflip.double(),
            self.scale,
            self.angle.cos() - 1,
            self.angle.sin(),
            self.aniso * self.aniso_axis.cos(),
            self.aniso * self.aniso_axis.sin(),
            self.shift[:, 0],
            self.shift[:, 1],
        ]
        return torch.stack(columns, dim=1)


@dataclass(frozen=True)
class AugmentPipe:
    """EDM non-leaky augmentation; defaults are EDM's CIFAR-10 settings (method-notes b.6).

    Parameters
    ----------
    p : float
        Overall probability multiplier in ``[0, 1]``.
    xflip, yflip, scale, rotate_frac, aniso, translate_frac : float
        Per-transform multipliers (>= 0); transform k fires with probability
        ``min(1, p * multiplier_k)``.
    scale_std : float
        Std of ``log2`` of the isotropic scale.
    rotate_max : float
        Maximum rotation as a fraction of pi, in ``[0, 1]``.
    aniso_std : float
        Std of ``log2`` of the anisotropic stretch.
    aniso_rotate_prob : float
        Probability that the stretch axis is rotated by a uniform angle rather than horizontal.
    translate_std : float
        Std of the translation, as a fraction of the image width / height.
    """

    p: float = 0.12
    xflip: float = 1e8
    yflip: float = 1.0
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2
    rotate_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_std: float = 0.125

    def __post_init__(self):
        for name in ("p", "rotate_max", "aniso_rotate_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in (*MULTIPLIERS, "scale_std", "aniso_std", "translate_std"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)!r}")

    def draw(self, n: int, generator: torch.Generator | None, device: torch.device) -> AugmentDraw:
        """Random parameters for ``n`` images, drawn on ``device``.

        Draws always consume the same amount of randomness, so the stream does not depend on
        the settings.
        """
        kw = dict(generator=generator, device=device, dtype=torch.float64)
        p_fire = [min(1.0, self.p * getattr(self, name)) for name in MULTIPLIERS]
        fire = torch.rand(n, 6, **kw) < torch.tensor(p_fire, dtype=torch.float64, device=device)
        coin = torch.rand(n, 2, **kw) < 0.5
        normal = torch.randn(n, 4, **kw)
        uniform = torch.rand(n, 3, **kw)
        rotated_axis = uniform[:, 2] < self.aniso_rotate_prob
        return AugmentDraw(
            xflip=fire[:, 0] & coin[:, 0],
            yflip=fire[:, 1] & coin[:, 1],
            scale=torch.where(fire[:, 2], normal[:, 0], 0.0),
            angle=torch.where(fire[:, 3], (2 * uniform[:, 0] - 1) * math.pi * self.rotate_max, 0.0),
            aniso=torch.where(fire[:, 4], normal[:, 1], 0.0),
            aniso_axis=torch.where(rotated_axis, (2 * uniform[:, 1] - 1) * math.pi, 0.0),
            shift=torch.where(fire[:, 5:6], normal[:, 2:4], 0.0),
        )

    def inverse_maps(self, draw: AugmentDraw, h: int, w: int) -> torch.Tensor:
        """``[N, 3, 3]`` float64 output-to-input maps of the geometric transforms, for
        :func:`apply_affine`: the inverse of the forward map ``T A R S`` (EDM's composition)."""
        s = torch.exp2(draw.scale * self.scale_std)
        a = torch.exp2(draw.aniso * self.aniso_std)
        shift = draw.shift * torch.tensor([w, h], dtype=torch.float64) * self.translate_std
        r = draw.aniso_axis
        # With y down, _rotation(+angle) turns clockwise on screen: the forward (counter-clockwise)
        # rotation is _rotation(-angle) and its inverse _rotation(angle).
        return (
            _scaling(1 / s, 1 / s)
            @ _rotation(draw.angle)
            @ _rotation(-r) @ _scaling(1 / a, a) @ _rotation(r)
            @ _translation(*(-shift).unbind(1))
        )  # fmt: skip

    def apply(self, images: torch.Tensor, draw: AugmentDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images`` with the parameters ``draw`` (see :meth:`__call__`)."""
        h, w = images.shape[2:]
        out = torch.where(draw.xflip.to(images.device)[:, None, None, None], images.flip(3), images)
        out = torch.where(draw.yflip.to(images.device)[:, None, None, None], out.flip(2), out)
        # Images on which a geometric transform fired are resampled; which is decided where the
        # draw lives (the CPU in training), so images on a GPU cost no synchronisation here.
        geometric = (draw.scale != 0) | (draw.angle != 0) | (draw.aniso != 0)
        geometric |= (draw.shift != 0).any(1)
        if geometric.any():
            idx = geometric.nonzero().squeeze(1)
            inverse = self.inverse_maps(draw, h, w)[idx]
            idx = idx.to(images.device)
            out = out.index_copy(0, idx, apply_affine(out[idx], inverse))
        return out, draw.labels().to(device=images.device, dtype=images.dtype)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a float ``[N, C, H, W]`` batch (typically in ``[-1, 1]``).

        Returns the augmented copy and its ``[N, 9]`` labels (module docstring) in the images'
        dtype. All random draws come from ``generator``, on its device (the images' device when
        omitted), and are moved to the images' device.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float [N, C, H, W] tensor, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        device = generator.device if generator is not None else images.device
        return self.apply(images, self.draw(len(images), generator, device))
