"""EDM's non-leaky geometric augmentation (Karras et al. 2022, appendix; method-notes b.6).

Every training image may be flipped, scaled, rotated, stretched and shifted; the network is told
what was done through a 9-dim augmentation label and sees zeros at sampling time, so the
augmentations do not leak into generated images. CIFAR-10 settings (EDM ``train.py``):
``p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1``.

Each transform fires independently per image with probability ``min(1, p * multiplier)``; with
``xflip=1e8`` the x-flip is always eligible and then flips with probability 0.5. The parameter
distributions follow EDM's ``augment.py``:

========  =====================================================  =================================
index     transform and distribution                             label when it fired (else 0)
========  =====================================================  =================================
0         x-flip: coin flip                                      1 if flipped, else 0
1         y-flip: coin flip                                      1 if flipped, else 0
2         isotropic scale ``s = 2 ** (z * scale_std)``,          ``z ~ N(0, 1)``
          ``z ~ N(0, 1)``
3, 4      rotation by ``a ~ U(-pi, pi) * rotate_max``            ``cos(a) - 1``, ``sin(a)``
5, 6      anisotropic scale ``2 ** (z * aniso_std)`` along axis  ``z cos(r)``, ``z sin(r)``
          angle ``r`` and its inverse across it; ``r ~ U(-pi,
          pi)`` with probability ``aniso_rotate_prob``, else 0
7, 8      translation by ``(z_x W, z_y H) * translate_std``      ``z_x``, ``z_y``
          pixels, ``z ~ N(0, 1)``
========  =====================================================  =================================

As in EDM, the aniso label ``z (cos r, sin r)`` does not distinguish ``(z, r)`` from
``(-z, r + pi)``, which are different stretches; we keep EDM's encoding for parity.

The flips are exact pixel flips, applied first. Scale, rotation, stretch and translation are
composed into one affine map per image (forward ``T A R S``: scale first, translate last, about
the image centre, in pixel units with x right and y down, so a positive angle turns the content
clockwise on screen) and applied by one ``grid_sample`` call. Simplification: EDM pads by
reflection, upsamples 2x with a sym6 wavelet filter, resamples bilinearly and downsamples; we
resample once with bicubic (default) or bilinear interpolation and ``grid_sample``'s reflection
padding, which mirrors about the outer pixel edges rather than the edge pixel centres. Bicubic
stays sharper than bilinear but PyTorch's kernel (a = -0.75) displaces content by up to ~0.05 px
at quarter-pixel offsets; bilinear is unbiased but blurs. Images on which no geometric transform
fired are not resampled at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aot_model.checks import check_choice

AUGMENT_DIM = 9
INTERPOLATIONS = ("bicubic", "bilinear")


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 3]`` rotations by ``angle`` (radians) in homogeneous 2-D coordinates."""
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


def apply_affine(
    images: torch.Tensor, inverse: torch.Tensor, *, interpolation: str = "bicubic"
) -> torch.Tensor:
    """Resample each image through an affine map given in pixel coordinates.

    Parameters
    ----------
    images : torch.Tensor
        ``[N, C, H, W]`` float.
    inverse : torch.Tensor
        ``[N, 3, 3]`` maps from output to input positions, in pixels measured from the image
        centre (x right, y down): output pixel ``q`` takes the input value at ``inverse @ q``.
    interpolation : {"bicubic", "bilinear"}
        ``grid_sample`` mode; outside the image, coordinates are reflected.

    Returns
    -------
    torch.Tensor
        ``[N, C, H, W]``. Integer translations reproduce shifted pixels exactly away from the
        borders (up to float rounding of the sampling grid).
    """
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    n, _, h, w = images.shape
    if inverse.shape != (n, 3, 3):
        raise ValueError(f"inverse must have shape ({n}, 3, 3), got {tuple(inverse.shape)}")
    # affine_grid works in [-1, 1] coordinates spanning the pixel edges (align_corners=False),
    # i.e. pixel offset from the centre = normalised coordinate * size / 2.
    to_pixels = torch.diag(torch.tensor([w / 2, h / 2, 1.0], dtype=torch.float64))
    to_unit = torch.diag(torch.tensor([2 / w, 2 / h, 1.0], dtype=torch.float64))
    theta = to_unit @ inverse.to(torch.float64).cpu() @ to_pixels
    grid = F.affine_grid(theta[:, :2], [n, 1, h, w], align_corners=False)
    grid = grid.to(device=images.device, dtype=images.dtype)
    return F.grid_sample(
        images, grid, mode=interpolation, padding_mode="reflection", align_corners=False
    )


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
    interpolation : {"bicubic", "bilinear"}
        Resampling filter of the geometric transforms.
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
    interpolation: str = "bicubic"

    def __post_init__(self):
        for name in ("p", "rotate_max", "aniso_rotate_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in (
            "xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac",
            "scale_std", "aniso_std", "translate_std",
        ):  # fmt: skip
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)!r}")
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)

    def _fire_probabilities(self) -> list[float]:
        multipliers = (
            self.xflip, self.yflip, self.scale, self.rotate_frac, self.aniso, self.translate_frac,
        )  # fmt: skip
        return [min(1.0, self.p * m) for m in multipliers]

    def _draw(self, n: int, h: int, w: int, generator: torch.Generator | None, device):
        """Random parameters for ``n`` images of size ``h x w``.

        Returns x-flip and y-flip masks ``[n]``, a geometric mask ``[n]`` (some geometric
        transform fired), inverse affine maps ``[n, 3, 3]`` for :func:`apply_affine`, and the
        labels ``[n, 9]`` (float64, on ``device``). Draws always consume the same amount of
        randomness, so the stream does not depend on the settings.
        """
        kw = dict(generator=generator, device=device, dtype=torch.float64)
        probabilities = torch.tensor(self._fire_probabilities(), device=device, dtype=torch.float64)
        fire = torch.rand(n, 6, **kw) < probabilities
        coin = torch.rand(n, 2, **kw) < 0.5
        normal = torch.randn(n, 4, **kw)
        uniform = torch.rand(n, 3, **kw)
        zero = torch.zeros((), device=device, dtype=torch.float64)

        flips = fire[:, :2] & coin
        scale_z = torch.where(fire[:, 2], normal[:, 0], zero)
        angle = torch.where(fire[:, 3], (2 * uniform[:, 0] - 1) * math.pi * self.rotate_max, zero)
        aniso_z = torch.where(fire[:, 4], normal[:, 1], zero)
        axis = torch.where(
            uniform[:, 2] < self.aniso_rotate_prob, (2 * uniform[:, 1] - 1) * math.pi, zero
        )
        shift = torch.where(fire[:, 5:6], normal[:, 2:4], zero)

        s = torch.exp2(scale_z * self.scale_std)
        a = torch.exp2(aniso_z * self.aniso_std)
        tx, ty = shift[:, 0] * w * self.translate_std, shift[:, 1] * h * self.translate_std
        # Inverse of the forward map T A R S: undo the translation first, the scale last.
        inverse = (
            _scaling(1 / s, 1 / s)
            @ _rotation(-angle)
            @ _rotation(axis) @ _scaling(1 / a, a) @ _rotation(-axis)
            @ _translation(-tx, -ty)
        )  # fmt: skip
        labels = torch.stack(
            [
                flips[:, 0].double(),
                flips[:, 1].double(),
                scale_z,
                angle.cos() - 1,
                angle.sin(),
                aniso_z * axis.cos(),
                aniso_z * axis.sin(),
                shift[:, 0],
                shift[:, 1],
            ],
            dim=1,
        )
        return flips[:, 0], flips[:, 1], fire[:, 2:].any(dim=1), inverse, labels

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch.

        Parameters
        ----------
        images : torch.Tensor
            ``[N, C, H, W]`` float, typically in ``[-1, 1]``.
        generator : torch.Generator, optional
            Source of all random draws, which are made on the generator's device (the images'
            device when omitted) and moved to the images' device.

        Returns
        -------
        images : torch.Tensor
            ``[N, C, H, W]`` augmented copy.
        labels : torch.Tensor
            ``[N, 9]`` augmentation labels in the images' dtype (see the module docstring).
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float [N, C, H, W] tensor, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        n, _, h, w = images.shape
        device = generator.device if generator is not None else images.device
        xflip, yflip, geometric, inverse, labels = self._draw(n, h, w, generator, device)
        xflip, yflip, geometric = (m.to(images.device) for m in (xflip, yflip, geometric))

        out = torch.where(xflip[:, None, None, None], images.flip(3), images)
        out = torch.where(yflip[:, None, None, None], out.flip(2), out)
        if geometric.any():
            idx = geometric.nonzero().squeeze(1)
            warped = apply_affine(
                out[idx], inverse[idx.to(inverse.device)], interpolation=self.interpolation
            )
            out = out.index_copy(0, idx, warped)
        return out, labels.to(device=images.device, dtype=images.dtype)
