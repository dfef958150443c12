"""Discriminator Guidance: ADM architecture, log-ratio gradient, training, guided sampling."""

import math

import numpy as np
import pytest
import torch

from aot_model.adm import (
    ADM32_CLASSIFIER,
    DG_HEAD,
    AttentionBlock,
    EncoderUNet,
    load_encoder,
    save_encoder,
)
from aot_model.files import DamagedFileError
from aot_model.guidance import (
    DG_SIGMA_THRESHOLD,
    Discriminator,
    Guidance,
    load_discriminator,
    log_ratio_grad,
    save_discriminator,
    train_discriminator,
    train_noise_classifier,
    vp_sigma,
    vp_time,
)
from aot_model.sampling import heun_sampler, sigma_steps
from aot_model.sweep import SweepPoint, generate_images, run_sweep

# 4x4 one-channel toy images: the smallest ADM encoder (GroupNorm(32) needs 32 channels).
TINY_EXTRACTOR = {
    "image_size": 4,
    "in_channels": 1,
    "model_channels": 32,
    "out_channels": 2,
    "num_res_blocks": 1,
    "attention_ds": (2,),
    "channel_mult": (1, 1),
    "num_head_channels": 16,
}
TINY_HEAD = {
    "image_size": 2,
    "in_channels": 32,
    "model_channels": 32,
    "out_channels": 1,
    "num_res_blocks": 1,
    "attention_ds": (1,),
    "channel_mult": (1,),
    "num_head_channels": 32,
}


def tiny_discriminator(seed: int = 0, **head) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(EncoderUNet(**TINY_EXTRACTOR), EncoderUNet(**{**TINY_HEAD, **head}))


def count(config: dict) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in EncoderUNet(**config).parameters())


# ----------------------------------------------------------------------------- ADM architecture


def test_adm_classifier_and_dg_head_parameter_counts():
    """method-notes g.2: 47,771,112 (ADM 32x32 classifier); 2,883,841 / 3,395,841 (DG head)."""
    assert count(ADM32_CLASSIFIER) == 47_771_112
    assert count(DG_HEAD) == 2_883_841
    assert count({**DG_HEAD, "num_classes": 1000}) == 3_395_841
    with torch.device("meta"):
        net = EncoderUNet(**ADM32_CLASSIFIER)
    assert (net.feature_channels, net.feature_size) == (DG_HEAD["in_channels"], 8)


def test_adm_state_dict_uses_adm_key_names():
    """A guided-diffusion checkpoint must load by name: spot-check ADM's layout."""
    with torch.device("meta"):
        keys = set(EncoderUNet(**ADM32_CLASSIFIER).state_dict())
    for key in (
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.1.1.qkv.weight",
        "input_blocks.1.1.proj_out.weight",
        "input_blocks.5.0.in_layers.0.weight",  # the downsampling ResBlock after 4 blocks
        "input_blocks.6.0.skip_connection.weight",  # 128 -> 256 channels
        "middle_block.1.norm.weight",
        "out.2.positional_embedding",
        "out.2.qkv_proj.weight",
        "out.2.c_proj.bias",
    ):
        assert key in keys, key


def test_attention_block_matches_per_head_reference():
    """ADM's legacy order: head h's q, k, v are channels [3ch·h, 3ch·h + ch), then k, then v."""
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16)
    torch.nn.init.normal_(block.proj_out.weight)
    x = torch.randn(2, 64, 3, 3)
    qkv = block.qkv(block.norm(x.reshape(2, 64, 9)))
    heads = []
    for h in range(4):
        q, k, v = (qkv[:, 48 * h + 16 * i : 48 * h + 16 * (i + 1)] for i in range(3))
        weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 4.0, dim=-1)
        heads.append(torch.einsum("bts,bcs->bct", weights, v))
    expected = x.reshape(2, 64, 9) + block.proj_out(torch.cat(heads, 1))
    torch.testing.assert_close(block(x), expected.reshape(x.shape), rtol=1e-5, atol=1e-5)


def test_encoder_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    torch.manual_seed(0)
    net = EncoderUNet(**TINY_EXTRACTOR)
    save_encoder(tmp_path / "enc.pt", net, note="x")
    loaded, info = load_encoder(tmp_path / "enc.pt")
    assert info == {"note": "x"}
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([10.0, 500.0])
    torch.testing.assert_close(loaded(x, t), net.eval()(x, t))
    torch.save(net.state_dict(), tmp_path / "bare.pt")  # as guided-diffusion ships a classifier
    assert load_encoder(tmp_path / "bare.pt", TINY_EXTRACTOR)[0].config == net.config
    with pytest.raises(ValueError, match=r"does not fit the architecture.*misshapen"):
        load_encoder(tmp_path / "bare.pt", {**TINY_EXTRACTOR, "model_channels": 64})
    with pytest.raises(ValueError, match="missing"):
        load_encoder(tmp_path / "bare.pt", {**TINY_EXTRACTOR, "num_res_blocks": 2})


def test_damaged_or_foreign_encoder_files_are_one_line_errors(tmp_path):
    save_encoder(tmp_path / "enc.pt", EncoderUNet(**TINY_EXTRACTOR))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "enc.pt").read_bytes()[:3000])
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save(EncoderUNet(**TINY_EXTRACTOR).state_dict(), tmp_path / "bare.pt")
    for name, expected in [
        ("truncated.pt", "is not a readable encoder checkpoint: truncated, corrupt"),
        ("list.pt", "holds a list, not a state dict"),
        ("bare.pt", "is not an encoder file"),  # a bare state dict needs its config
    ]:
        with pytest.raises(DamagedFileError) as info:
            load_encoder(tmp_path / name, remedy="do this")
        message = str(info.value)
        assert str(tmp_path / name) in message and expected in message, message
        assert message.endswith("; do this") and "\n" not in message


# ----------------------------------------------------------------------------- noise levels


def test_vp_time_matches_dg_constants():
    """method-notes g.3/g.4: tau = 0.01 <-> sigma 0.0447, tau = 1 <-> 152.2, tau(80) = 0.934."""
    assert vp_sigma(0.01) == pytest.approx(0.04469, abs=1e-5)
    assert vp_sigma(1.0) == pytest.approx(152.2, abs=0.1)
    assert vp_time(torch.tensor(80.0, dtype=torch.float64)).item() == pytest.approx(0.934, abs=1e-3)
    sigma = torch.logspace(-3, 2, 20, dtype=torch.float64)
    back = torch.tensor([vp_sigma(t) for t in vp_time(sigma).tolist()], dtype=torch.float64)
    torch.testing.assert_close(back, sigma, rtol=1e-9, atol=0)
    assert abs(DG_SIGMA_THRESHOLD - vp_sigma(0.01)) < 1e-4


# ----------------------------------------------------------------------------- log-ratio gradient


def test_log_ratio_gradient_matches_finite_differences():
    disc = tiny_discriminator().double()
    for p in disc.head.parameters():  # make the zero-initialised branches non-trivial
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64) * 0.5
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    grad, ratio = log_ratio_grad(disc, x, sigma)

    def log_d_over_1_minus_d(z):
        d = torch.sigmoid(disc(z, sigma))
        return torch.log(d) - torch.log1p(-d)

    torch.testing.assert_close(ratio, log_d_over_1_minus_d(x))
    eps, rng = 1e-6, np.random.default_rng(0)
    for flat in rng.choice(16, 6, replace=False):
        step = torch.zeros_like(x).reshape(2, -1)
        step[:, flat] = eps
        step = step.reshape(x.shape)
        fd = (log_d_over_1_minus_d(x + step) - log_d_over_1_minus_d(x - step)) / (2 * eps)
        torch.testing.assert_close(grad.reshape(2, -1)[:, flat], fd, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- toy data

MU_REAL, MU_FAKE, SPREAD = -0.1, 0.1, 0.3  # overlapping: d is not saturated
# The toy sampler starts at the top of the discriminator's training range: above it, the factor
# sigma * step ~ sigma^2 would amplify whatever the head extrapolates to.
TOY_SIGMA_MAX = 5.0


def gaussian_images(mu: float, n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(mu, SPREAD, size=(n, 1, 4, 4))
    return np.clip(np.round(x * 127.5 + 128), 0, 255).astype(np.uint8)


def fake_denoiser(x, sigma, class_labels=None):
    """Exact denoiser of the fake data N(MU_FAKE, SPREAD^2 I): the model guidance must correct."""
    s = sigma.reshape(-1, 1, 1, 1)
    return MU_FAKE + SPREAD**2 / (SPREAD**2 + s**2) * (x - MU_FAKE)


@pytest.fixture(scope="module")
def toy_discriminator():
    disc, info = train_discriminator(
        tiny_discriminator(),
        gaussian_images(MU_REAL, 512, 0),
        gaussian_images(MU_FAKE, 512, 1),
        epochs=4,
        batch_size=32,
        lr=1e-3,
        sigma_range=(1e-3, TOY_SIGMA_MAX),
    )
    return disc, info


def test_discriminator_separates_toy_data(toy_discriminator):
    disc, info = toy_discriminator
    assert len(info["history"]) == 4 and info["chosen_epoch"] == 4  # no evaluate: the last epoch
    assert info["history"][-1]["heldout_accuracy"] > 0.7  # chance 0.5; over all sigma to 5
    with torch.no_grad():  # Bayes accuracy at low noise: Phi(0.2 * 4 / 0.3 / 2) = 0.91
        sigma = torch.full((256,), 0.05)
        real = torch.from_numpy(gaussian_images(MU_REAL, 256, 5)).float() / 127.5 - 1
        fake = torch.from_numpy(gaussian_images(MU_FAKE, 256, 6)).float() / 127.5 - 1
        assert (disc(real, sigma) > 0).float().mean() > 0.8
        assert (disc(fake, sigma) < 0).float().mean() > 0.8


def test_guidance_moves_samples_toward_real(toy_discriminator):
    disc, _ = toy_discriminator
    latents = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    settings = {"num_steps": 8, "sigma_max": TOY_SIGMA_MAX}
    plain = heun_sampler(fake_denoiser, latents, **settings)
    gaps = [(plain.images.mean() - MU_REAL).abs().item()]  # about 0.19
    for weight in (2.0, 4.0):
        guided = heun_sampler(fake_denoiser, latents, correction=Guidance(disc, weight), **settings)
        gaps.append((guided.images.mean() - MU_REAL).abs().item())
    assert gaps[2] < gaps[1] < gaps[0] and gaps[2] < 0.9 * gaps[0]  # stronger w, closer to real
    assert guided.nfe == plain.nfe and guided.corrections > 0


def test_checkpoint_choice_follows_evaluate(toy_discriminator, tmp_path):
    scores = {1: 3.0, 2: 1.0, 3: 2.0}
    disc, info = train_discriminator(
        tiny_discriminator(),
        gaussian_images(MU_REAL, 32, 0),
        gaussian_images(MU_FAKE, 32, 1),
        epochs=3,
        batch_size=32,
        evaluate=lambda epoch, d: scores[epoch],
    )
    assert info["chosen_epoch"] == 2 and [r["score"] for r in info["history"]] == [3.0, 1.0, 2.0]
    _, diverged = train_discriminator(
        tiny_discriminator(),
        gaussian_images(MU_REAL, 32, 0),
        gaussian_images(MU_FAKE, 32, 1),
        epochs=2,
        batch_size=32,
        evaluate=lambda epoch, d: math.nan if epoch == 1 else 5.0,
    )
    assert diverged["chosen_epoch"] == 2
    extractor_sha = save_encoder(tmp_path / "extractor.pt", disc.extractor)
    save_discriminator(tmp_path / "head.pt", disc, extractor_sha256=extractor_sha)
    loaded = load_discriminator(
        tmp_path / "head.pt", tmp_path / "extractor.pt", extractor_sha256=extractor_sha
    )
    x, sigma = torch.randn(3, 1, 4, 4), torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(loaded(x, sigma), disc(x, sigma))
    with pytest.raises(ValueError, match="trained on extractor"):
        load_discriminator(tmp_path / "head.pt", tmp_path / "extractor.pt", extractor_sha256="ab")


def test_aot_paired_noise_trains():
    _, info = train_discriminator(
        tiny_discriminator(),
        gaussian_images(MU_REAL, 32, 0),
        gaussian_images(MU_FAKE, 32, 1),
        epochs=1,
        batch_size=32,
        pairing="aot",
    )
    assert math.isfinite(info["history"][0]["loss"])


def test_noise_classifier_learns_toy_classes():
    images = np.concatenate([gaussian_images(-0.5, 128, 0), gaussian_images(0.5, 128, 1)])
    labels = np.repeat([0, 1], 128)
    net, info = train_noise_classifier(
        images, labels, TINY_EXTRACTOR, epochs=3, batch_size=64, sigma_range=(1e-3, 1.0)
    )
    assert info["heldout_accuracy_sigma_le_1"] > 0.8 and len(info["history"]) == 3
    assert not net.training


# ----------------------------------------------------------------------------- sampling hook


def test_guidance_off_is_bit_identical():
    disc = tiny_discriminator()
    latents = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    plain = heun_sampler(fake_denoiser, latents, num_steps=6)
    for hook in (Guidance(disc, 0.0), Guidance(disc, 2.0, sigma_threshold=100.0)):
        out = heun_sampler(fake_denoiser, latents, num_steps=6, correction=hook)
        assert torch.equal(out.images, plain.images) and out.corrections == hook.calls == 0


def test_guided_sweep_counts_dg_active_steps(tmp_path):
    """18 steps, rho 7: DG guides the 15 steps with sigma >= 0.0447 (method-notes g.4)."""
    disc = tiny_discriminator()
    expected = int((sigma_steps(18)[:-1] >= DG_SIGMA_THRESHOLD).sum())
    assert expected == 15
    points = [SweepPoint(18, 7.0), SweepPoint(18, 7.0, guidance_weight=2.0)]
    rows = run_sweep(
        fake_denoiser,
        points,
        range(6),
        out_dir=tmp_path,
        img_shape=(1, 4, 4),
        batch_size=3,
        guide=lambda w: Guidance(disc, w),
        progress=False,
    )
    assert [r.disc_calls for r in rows] == [0, expected]
    assert [r.point.nfe for r in rows] == [35, 35]
    assert rows[1].images.endswith("heun_s18_r7_w2.npz")
    second = Guidance(disc, 2.0, second_order=True)
    list(
        generate_images(fake_denoiser, points[1], range(3), img_shape=(1, 4, 4), correction=second)
    )
    active_next = int((sigma_steps(18)[1:-1] >= DG_SIGMA_THRESHOLD).sum())
    assert second.calls == expected + active_next


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_stop_before_work():
    disc = tiny_discriminator()
    for weight in (math.nan, math.inf):
        with pytest.raises(ValueError, match="guidance weight must be a finite number"):
            Guidance(disc, weight)
    with pytest.raises(ValueError, match="guidance_weight must be a finite number"):
        SweepPoint(4, 7.0, guidance_weight=math.nan)
    real = gaussian_images(MU_REAL, 8, 0)
    with pytest.raises(ValueError, match=r"fake samples must be uint8 \[N, 1, 4, 4\]"):
        train_discriminator(disc, real, np.zeros((8, 3, 4, 4), np.uint8), epochs=1)
    with pytest.raises(ValueError, match="head must take the extractor's 32x2x2 features"):
        Discriminator(EncoderUNet(**TINY_EXTRACTOR), EncoderUNet(**DG_HEAD))
    with pytest.raises(ValueError, match="guide="):
        run_sweep(
            fake_denoiser,
            [SweepPoint(4, 7.0, guidance_weight=1.0)],
            range(2),
            out_dir="unused",
            img_shape=(1, 4, 4),
        )
