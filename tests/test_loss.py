"""Tests of the EDM loss: closed-form values with fixed denoisers, weighting, sigma distribution."""

import math

import pytest
import torch

from aot_model.loss import EDMLoss, loss_weight, sample_sigma
from aot_model.networks import EDMPrecond, preconditioning


def zero_denoiser(x, sigma, class_labels=None, augment_labels=None):
    return torch.zeros_like(x)


def identity_denoiser(x, sigma, class_labels=None, augment_labels=None):
    return x


def batch(generator, n=5, shape=(3, 4, 4)):
    images = torch.rand(n, *shape, generator=generator) * 2 - 1
    noise = torch.randn(n, *shape, generator=generator)
    return images, noise


def sigmas_for_seed(seed: int, n: int) -> torch.Tensor:
    return sample_sigma(n, -1.2, 1.2, torch.Generator().manual_seed(seed))


def test_zero_denoiser_gives_weighted_sum_of_squares(generator):
    images, noise = batch(generator)
    loss = EDMLoss()(zero_denoiser, images, noise, generator=torch.Generator().manual_seed(7))
    sigma = sigmas_for_seed(7, 5)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss, weight * images.square().sum(dim=(1, 2, 3)))


def test_identity_denoiser_sees_images_plus_sigma_noise(generator):
    # D(x) = x = y + sigma n, so the loss is lambda sigma^2 |n|^2 = |n|^2 (sigma^2 + sd^2) / sd^2.
    images, noise = batch(generator)
    loss = EDMLoss()(identity_denoiser, images, noise, generator=torch.Generator().manual_seed(3))
    sigma = sigmas_for_seed(3, 5)
    expected = (sigma**2 + 0.25) / 0.25 * noise.square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)


def test_net_receives_per_image_sigma_and_conditioning(generator):
    images, noise = batch(generator, n=4)
    labels, augment = torch.eye(4), torch.randn(4, 9, generator=generator)
    calls = []

    def recording_denoiser(x, sigma, class_labels=None, augment_labels=None):
        calls.append((x, sigma, class_labels, augment_labels))
        return x

    EDMLoss()(
        recording_denoiser,
        images,
        noise,
        labels,
        augment,
        generator=torch.Generator().manual_seed(11),
    )
    x, sigma, seen_labels, seen_augment = calls[0]
    torch.testing.assert_close(sigma, sigmas_for_seed(11, 4))
    torch.testing.assert_close(x, images + sigma.reshape(-1, 1, 1, 1) * noise)
    assert seen_labels is labels
    assert seen_augment is augment


def test_fresh_edm_denoiser_closed_form(generator):
    # With the output conv zeroed, F_theta = 0 exactly, so D(x; sigma) = c_skip(sigma) x.
    net = EDMPrecond(
        8,
        3,
        arch="ncsnpp",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    torch.nn.init.zeros_(net.model.out_conv.weight)
    images, noise = batch(generator, n=3, shape=(3, 8, 8))
    loss = EDMLoss()(net, images, noise, generator=torch.Generator().manual_seed(5))
    sigma = sigmas_for_seed(5, 3)
    c_skip = (0.25 / (sigma**2 + 0.25)).reshape(-1, 1, 1, 1)
    residual = c_skip * (images + sigma.reshape(-1, 1, 1, 1) * noise) - images
    expected = loss_weight(sigma) * residual.square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)
    loss.mean().backward()
    assert net.model.out_conv.weight.grad.abs().sum() > 0


def test_weight_times_c_out_squared_is_one():
    sigma = torch.logspace(-3, 2, 21, dtype=torch.float64)
    for sigma_data in (0.5, 1.3):
        _, c_out, _, _ = preconditioning(sigma, sigma_data)
        torch.testing.assert_close(
            loss_weight(sigma, sigma_data) * c_out**2, torch.ones_like(sigma)
        )


@pytest.mark.parametrize(("p_mean", "p_std"), [(-1.2, 1.2), (0.5, 2.0)])
def test_log_sigma_moments(p_mean, p_std):
    log_sigma = sample_sigma(200_000, p_mean, p_std, torch.Generator().manual_seed(0)).log()
    # Standard errors: p_std / 447 for the mean, about p_std / 632 for the std.
    assert log_sigma.mean().item() == pytest.approx(p_mean, abs=0.02 * p_std)
    assert log_sigma.std().item() == pytest.approx(p_std, rel=0.01)
    assert sample_sigma(3).dtype == torch.float32


def test_seeded_generator_is_deterministic(generator):
    images, noise = batch(generator)
    loss_fn = EDMLoss()

    def run(seed):
        return loss_fn(zero_denoiser, images, noise, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_bad_inputs_raise():
    images = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="noise"):
        EDMLoss()(zero_denoiser, images, torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="P_std"):
        EDMLoss(P_std=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMLoss(sigma_data=-1.0)


def test_default_constants_match_edm():
    loss_fn = EDMLoss()
    assert (loss_fn.P_mean, loss_fn.P_std, loss_fn.sigma_data) == (-1.2, 1.2, 0.5)
    assert loss_weight(torch.tensor(0.5)).item() == pytest.approx(2 * 0.25 / 0.0625)
    assert math.isclose(loss_weight(torch.tensor(1.0), 1.0).item(), 2.0)


def test_sample_sigma_defaults_are_edm_and_match_explicit_arguments():
    draw = sample_sigma(1000, generator=torch.Generator().manual_seed(3))
    explicit = sample_sigma(1000, -1.2, 1.2, torch.Generator().manual_seed(3))
    assert torch.equal(draw, explicit)


def test_non_default_sigma_data_enters_the_weight(generator):
    """EDMLoss(sigma_data=1) weights by (sigma^2 + 1) / sigma^2, not the default 0.5's weight."""
    images, noise = batch(generator)
    loss = EDMLoss(sigma_data=1.0)(
        zero_denoiser, images, noise, generator=torch.Generator().manual_seed(7)
    )
    sigma = sigmas_for_seed(7, 5)
    weight = (sigma**2 + 1.0) / sigma**2
    torch.testing.assert_close(loss, weight * images.square().sum(dim=(1, 2, 3)))


def test_validation_boundaries():
    EDMLoss(P_std=0.5, sigma_data=1e-3)  # small positive values are fine
    with pytest.raises(ValueError, match="sigma_data must be > 0, got 0"):
        EDMLoss(sigma_data=0.0)
    # Any batched shape [N, ...] works, e.g. flat vectors [N, D].
    flat = torch.ones(3, 4)
    loss = EDMLoss()(
        zero_denoiser, flat, torch.zeros(3, 4), generator=torch.Generator().manual_seed(7)
    )
    weight = (sigmas_for_seed(7, 3) ** 2 + 0.25) / (sigmas_for_seed(7, 3) * 0.5) ** 2
    torch.testing.assert_close(loss, weight * 4)
    with pytest.raises(ValueError, match=r"images must be batched \[N, \.\.\.\], got shape \(4,\)"):
        EDMLoss()(zero_denoiser, torch.ones(4), torch.ones(4))


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cpu", False)])
def test_sigma_for_a_gpu_is_drawn_into_pinned_memory_and_copied_without_blocking(
    monkeypatch, device, pinned
):
    """A copy from pageable memory would wait for the GPU every micro-batch (stand-in draw)."""
    normal = torch.randn(4, generator=torch.Generator().manual_seed(0))
    calls = {}

    class Drawn:
        def to(self, target, non_blocking=False):
            calls["to"] = (target, non_blocking)
            return normal

    def randn(*args, **kwargs):
        calls["randn"] = kwargs
        return Drawn()

    monkeypatch.setattr(torch, "randn", randn)
    sigma = sample_sigma(4, generator=torch.Generator(), device=device)
    assert calls["randn"]["pin_memory"] is pinned and calls["to"] == (device, True)
    torch.testing.assert_close(sigma, (normal * 1.2 - 1.2).exp())
