"""EDM training loss (Karras et al. 2022, eq. 8 and Table 1; method-notes b.1).

loss_i = lambda(sigma_i) * || D(y_i + sigma_i n_i; sigma_i) - y_i ||^2, summed over pixels, with
ln sigma_i ~ N(P_mean, P_std^2) drawn per image and lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2.

The unit noise n is an argument rather than drawn here: under AOT it has already been paired with
the images by an assignment over a pool (aot_model.pairing), and plain EDM passes i.i.d. noise.
The pairing never sees sigma; sigma is drawn here, after it (method-notes a.3).
"""

import torch
from torch import nn


def sample_sigma(
    n: int,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` per-image training noise levels, float32, ln sigma ~ N(P_mean, P_std^2), on ``device``.

    Drawn on ``generator``'s device, or on ``device`` when ``generator`` is None.
    """
    draw_device = generator.device if generator is not None else device
    # Drawn on the CPU for a GPU: pinned, so the copy is queued without waiting for the GPU's
    # queue to drain (a copy from pageable memory synchronises every micro-batch).
    pin = (
        torch.device(draw_device or "cpu").type == "cpu"
        and torch.device(device or "cpu").type == "cuda"
    )
    normal = torch.randn(
        n, generator=generator, device=draw_device, dtype=torch.float32, pin_memory=pin
    )
    return (normal.to(device, non_blocking=True) * P_std + P_mean).exp()


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out(sigma)^2 (EDM Table 1)."""
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


class EDMLoss:
    """Per-image EDM denoising loss: sigma is log-normal with ``P_mean``, ``P_std`` (EDM: -1.2,
    1.2); ``sigma_data`` is the data standard deviation in the loss weight (EDM: 0.5)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        if P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-image loss ``[N]``, lambda(sigma_i) * sum over pixels of (D(y_i + sigma_i n_i;
        sigma_i) - y_i)^2, of denoiser ``net(x, sigma[N], labels, augment_labels)`` (e.g.
        EDMPrecond) on clean (augmented) images y ``[N, C, H, W]`` in [-1, 1] and the unit noise n
        paired with them (AOT-matched or i.i.d.); ``labels`` are one-hot, ``generator`` draws sigma.
        """
        if noise.shape != images.shape:
            raise ValueError(
                f"noise must have the same shape as images {tuple(images.shape)}, "
                f"got {tuple(noise.shape)}"
            )
        if images.ndim < 2:
            raise ValueError(f"images must be batched [N, ...], got shape {tuple(images.shape)}")
        sigma = sample_sigma(images.shape[0], self.P_mean, self.P_std, generator, images.device)
        per_pixel = sigma.reshape(-1, *([1] * (images.ndim - 1)))
        denoised = net(images + per_pixel * noise, sigma, labels, augment_labels)
        squared_error = (denoised - images).square().flatten(1).sum(dim=1)
        return loss_weight(sigma, self.sigma_data) * squared_error
