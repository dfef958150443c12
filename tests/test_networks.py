"""EDM denoiser tests: paper parameter counts, preconditioning closed forms, tiny-model I/O."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import randomise_parameters
from torch import nn

from aot_model.networks import (
    ATTN_QKV_GAIN,
    NEAR_ZERO_GAIN,
    EDMPrecond,
    FourierEmbedding,
    PositionalEmbedding,
    Resample,
    SongUNet,
    UNetBlock,
    preconditioning,
)

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
RES = 16


def tiny_net(arch: str, label_dim: int = 0, augment_dim: int = 9, **overrides) -> EDMPrecond:
    return EDMPrecond(
        RES, 3, label_dim=label_dim, arch=arch, augment_dim=augment_dim, **{**TINY, **overrides}
    )


def randomise_output_layer(net: EDMPrecond, generator: torch.Generator) -> None:
    """Give the near-zero output conv large random weights so F_theta clearly depends on inputs."""
    with torch.no_grad():
        weight = net.model.out_conv.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


def one_hot(n: int, label_dim: int = 10) -> torch.Tensor:
    return F.one_hot(torch.arange(n) % label_dim, label_dim).float()


# Ground truth: NVlabs/edm EDMPrecond built with train.py's CIFAR-10 settings (method-notes b.4).
@pytest.mark.parametrize(
    ("arch", "label_dim", "augment_dim", "expected"),
    [
        ("ddpmpp", 0, 9, 55_733_891),
        ("ncsnpp", 0, 9, 56_397_827),
        ("ddpmpp", 10, 9, 55_735_299),
        ("ncsnpp", 10, 9, 56_400_643),
        ("ddpmpp", 0, 0, 55_732_739),
        ("ncsnpp", 0, 0, 56_395_523),
    ],
)
def test_paper_parameter_counts(arch, label_dim, augment_dim, expected):
    with torch.device("meta"):
        net = EDMPrecond(32, 3, label_dim=label_dim, arch=arch, augment_dim=augment_dim)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_preconditioning_closed_form():
    # At sigma = sigma_data: c_skip = 1/2, c_out = sd/sqrt(2), c_in = 1/(sd sqrt(2)).
    c_skip, c_out, c_in, c_noise = preconditioning(torch.tensor(0.5), 0.5)
    assert c_skip.item() == pytest.approx(0.5, rel=1e-6)
    assert c_out.item() == pytest.approx(0.5 / math.sqrt(2), rel=1e-6)
    assert c_in.item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert c_noise.item() == pytest.approx(math.log(0.5) / 4, rel=1e-6)
    for sigma in (0.002, 0.3, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = preconditioning(
            torch.tensor(sigma, dtype=torch.float64), 0.5
        )
        assert c_skip.item() == pytest.approx(0.25 / (sigma**2 + 0.25), rel=1e-12)
        assert c_out.item() == pytest.approx(sigma * 0.5 / math.sqrt(sigma**2 + 0.25), rel=1e-12)
        assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + 0.25), rel=1e-12)
        assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-12)
    # Unit variance of the network input and of the training target (EDM Appendix B.6).
    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    sd = 0.7
    c_skip, c_out, c_in, _ = preconditioning(sigma, sd)
    torch.testing.assert_close(c_in**2 * (sd**2 + sigma**2), torch.ones_like(sigma))
    torch.testing.assert_close(
        ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2, torch.ones_like(sigma)
    )


class RecordingBackbone(nn.Module):
    """Stands in for SongUNet: records its inputs and returns a fixed output."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output
        self.calls = []

    def forward(self, x, noise_labels, class_labels, augment_labels):
        self.calls.append((x, noise_labels, class_labels, augment_labels))
        return self.output


def test_zero_backbone_gives_c_skip_x(generator):
    net = tiny_net("ddpmpp")
    x = torch.randn(4, 3, RES, RES, generator=generator)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    net.model = RecordingBackbone(torch.zeros_like(x))
    c_skip = 0.25 / (sigma**2 + 0.25)
    assert torch.equal(net(x, sigma), c_skip.reshape(-1, 1, 1, 1) * x)


@pytest.mark.parametrize("sigma_data", [0.5, 0.3])
def test_precond_feeds_stand_in_backbone_c_in_x_and_c_noise(sigma_data, generator):
    net = tiny_net("ddpmpp", sigma_data=sigma_data)
    x = torch.randn(4, 3, RES, RES, generator=generator)
    f = torch.randn(4, 3, RES, RES, generator=generator)
    sigma = torch.tensor([0.01, 0.5, 2.0, 40.0])
    net.model = RecordingBackbone(f)
    out = net(x, sigma)
    c_skip, c_out, c_in, _ = preconditioning(sigma, sigma_data)
    seen_x, seen_noise, _, _ = net.model.calls[0]
    torch.testing.assert_close(seen_x, c_in.reshape(-1, 1, 1, 1) * x)
    torch.testing.assert_close(seen_noise, sigma.log() / 4)
    torch.testing.assert_close(
        out, c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * f
    )


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_real_network_output_changes_with_sigma_at_fixed_c_in_x(arch, generator):
    """The backbone sees one c_in * x at every sigma, so only c_noise can make F_theta differ."""
    net = randomise_parameters(tiny_net(arch), seed=0).eval()
    scaled = torch.randn(1, 3, RES, RES, generator=generator)  # c_in * x, held fixed
    f_thetas = []
    for value in (0.05, 1.0, 20.0):
        sigma = torch.tensor([value])
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1, 1, 1) for c in preconditioning(sigma))
        x = scaled / c_in
        f_thetas.append((net(x, sigma) - c_skip * x) / c_out)
    for a, b in itertools.combinations(f_thetas, 2):
        assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_fresh_output_layer_is_edm_xavier_times_1e5(arch, generator):
    """EDM's init of the last conv: xavier-uniform scaled by 1e-5, so a fresh F_theta is tiny
    but not zero (it depends on its inputs) and D(x; sigma) is c_skip * x to about 1e-5."""
    net = tiny_net(arch, label_dim=10)
    weight = net.model.out_conv.weight
    fan_in, fan_out = weight.shape[1] * 9, weight.shape[0] * 9
    bound = 1e-5 * math.sqrt(6 / (fan_in + fan_out))
    assert 0.9 * bound < weight.abs().max() <= bound
    assert torch.equal(net.model.out_conv.bias, torch.zeros_like(net.model.out_conv.bias))
    x = torch.randn(3, 3, RES, RES, generator=generator)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    f_x = net.model(x, sigma.log() / 4, one_hot(3), torch.randn(3, 9, generator=generator))
    assert 0 < f_x.abs().max() < 1e-3
    c_skip = (0.25 / (sigma**2 + 0.25)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(net(x, sigma, one_hot(3)), c_skip * x, atol=1e-4, rtol=0)


def edm_init_gain(name: str) -> float:
    """EDM's gain for the layer called ``name``: near zero for the last conv of every residual
    branch and of the network, sqrt(0.2) for attention's qkv, 1 elsewhere."""
    if name.endswith(("conv1", "attention.proj", "out_conv")):
        return NEAR_ZERO_GAIN
    return ATTN_QKV_GAIN if name.endswith("qkv") else 1.0


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_every_layer_has_edms_initialisation(arch):
    """Each conv and linear weight is xavier-uniform times its gain (largest |w| within 20 % of
    the bound, never over it) and each bias is zero; the augment mapping has no bias."""
    torch.manual_seed(0)
    net = tiny_net(arch, label_dim=10)
    layers = {name: m for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    gains = {edm_init_gain(name) for name in layers}
    assert gains == {1.0, NEAR_ZERO_GAIN, ATTN_QKV_GAIN}
    for name, layer in layers.items():
        weight = layer.weight
        receptive = weight[0, 0].numel()
        fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
        bound = edm_init_gain(name) * math.sqrt(6 / (fan_in + fan_out))
        assert 0.8 * bound < weight.abs().max().item() <= bound * (1 + 1e-6), name
        if name.endswith("map_augment"):
            assert layer.bias is None
        else:
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias)), name
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(
        (norm.eps, norm.num_groups) == (1e-6, min(32, norm.num_channels // 4)) for norm in norms
    )


def test_dropout_reaches_every_residual_block():
    net = tiny_net("ncsnpp", dropout=0.3)
    blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
    # Encoder 1 + (down + 1), middle 2, decoder (2 + up) + 2 for two levels of one block.
    assert len(blocks) == 10
    assert all(block.dropout.p == 0.3 for block in blocks)


def test_label_dropout_draws_once_per_image():
    net = tiny_net("ddpmpp", label_dim=10, label_dropout=0.5).train()
    seen = []
    net.model.map_label.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    n = 400
    labels = one_hot(n)
    torch.manual_seed(0)
    net.model.embed(torch.zeros(n), labels, None)
    kept = seen[0].abs().sum(dim=1) > 0
    torch.testing.assert_close(seen[0][kept], labels[kept] * math.sqrt(10))
    assert 0.4 < kept.float().mean().item() < 0.6


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("label_dim", [0, 10])
@pytest.mark.parametrize("augment_dim", [0, 9])
def test_output_shape_dtype_and_conditioning(arch, label_dim, augment_dim, generator):
    net = tiny_net(arch, label_dim=label_dim, augment_dim=augment_dim).eval()
    randomise_output_layer(net, generator)
    n = 3
    # Float64 inputs: the preconditioning and the backbone still run in float32.
    x = torch.randn(n, 3, RES, RES, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    labels = one_hot(n).double() if label_dim else None
    augment = (
        torch.randn(n, augment_dim, generator=generator, dtype=torch.float64)
        if augment_dim
        else None
    )
    out = net(x, sigma, labels, augment)
    assert out.shape == (n, 3, RES, RES)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The output depends on the noise level and on every conditioning input it accepts.
    assert not torch.allclose(out, net(x, sigma * 2, labels, augment))
    if label_dim:
        other = one_hot(n).roll(1, dims=1).double()
        assert not torch.allclose(out, net(x, sigma, other, augment))
    if augment_dim:
        assert not torch.allclose(out, net(x, sigma, labels, None))


def test_scalar_sigma_broadcasts(generator):
    net = tiny_net("ncsnpp").eval()
    randomise_output_layer(net, generator)
    x = torch.randn(3, 3, RES, RES, generator=generator)
    torch.testing.assert_close(net(x, 0.7), net(x, torch.full((3,), 0.7)))


def test_fourier_frequencies_ignore_global_rng():
    torch.manual_seed(1)
    first = SongUNet(RES, 3, 3, embedding_type="fourier", channel_mult_noise=2, **TINY)
    torch.manual_seed(2)
    second = SongUNet(RES, 3, 3, embedding_type="fourier", channel_mult_noise=2, **TINY)
    assert first.map_noise.freqs.shape == (16,)
    assert torch.equal(first.map_noise.freqs, second.map_noise.freqs)
    # The weights do follow the global RNG, so the test above could have failed.
    assert not torch.equal(first.enc_in.weight, second.enc_in.weight)
    assert "map_noise.freqs" in first.state_dict()


def test_fourier_frequencies_follow_the_default_device():
    with torch.device("meta"):
        emb = FourierEmbedding(8)
    assert emb.freqs.device.type == "meta"


def test_fourier_frequencies_have_scale_16():
    freqs = FourierEmbedding(4096).freqs
    assert freqs.mean().abs().item() < 1.0
    assert freqs.std().item() == pytest.approx(16.0, rel=0.05)


def test_fourier_embedding_forward_closed_form():
    emb = FourierEmbedding(8)
    t = torch.tensor([0.0, -0.3, 1.7], dtype=torch.float64)
    f = emb.freqs.double().numpy()
    arg = 2 * np.pi * np.outer(t.numpy(), f)
    expected = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    # 2 pi f is formed in float32 and |arg| reaches ~200: float32 rounding of the argument.
    np.testing.assert_allclose(emb(t).numpy(), expected, rtol=0, atol=1e-4)


def test_positional_embedding_endpoint():
    emb = PositionalEmbedding(8)
    torch.testing.assert_close(
        emb.freqs, torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    )
    out = emb(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(out[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(out[1, :4], (2.0 * emb.freqs).sin())


@pytest.mark.parametrize("fir", [(1, 1), (1, 3, 3, 1), (1, 5, 10, 10, 5, 1)])
def test_resample_keeps_constants_and_halves_or_doubles(fir):
    x = torch.full((2, 5, 8, 8), 3.0, dtype=torch.float64)
    down = Resample(5, "down", fir)(x)
    up = Resample(5, "up", fir)(x)
    assert down.shape == (2, 5, 4, 4)
    assert up.shape == (2, 5, 16, 16)
    assert down.dtype == up.dtype == torch.float64
    # Zero padding touches only the border, wider for longer filters.
    border = len(fir) // 2 - 1
    inner = slice(border, -border or None)
    torch.testing.assert_close(
        down[..., inner, inner], torch.full_like(down[..., inner, inner], 3.0)
    )
    torch.testing.assert_close(up[..., inner, inner], torch.full_like(up[..., inner, inner], 3.0))


def test_resample_direction_must_be_up_or_down():
    with pytest.raises(ValueError, match=r"^direction must be one of \('up', 'down'\), got 'dn'$"):
        Resample(5, "dn", (1, 1))


def test_class_embedding_scales_labels_by_sqrt_label_dim():
    net = tiny_net("ddpmpp", label_dim=10)
    seen = []
    net.model.map_label.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    labels = one_hot(2)
    net(torch.zeros(2, 3, RES, RES), torch.ones(2), labels)
    torch.testing.assert_close(seen[0], labels * math.sqrt(10))


def test_missing_labels_mean_zero_labels(generator):
    net = tiny_net("ddpmpp", label_dim=10).eval()
    randomise_output_layer(net, generator)
    x = torch.randn(2, 3, RES, RES, generator=generator)
    torch.testing.assert_close(net(x, torch.ones(2)), net(x, torch.ones(2), torch.zeros(2, 10)))


def test_label_dropout_zeroes_labels_in_training_only(generator):
    net = tiny_net("ddpmpp", label_dim=10, label_dropout=1.0)
    randomise_output_layer(net, generator)
    x = torch.randn(2, 3, RES, RES, generator=generator)
    sigma, labels = torch.ones(2), one_hot(2)
    dropped = net.train()(x, sigma, labels)
    torch.testing.assert_close(dropped, net(x, sigma, torch.zeros(2, 10)))
    assert not torch.allclose(net.eval()(x, sigma, labels), dropped)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
def test_everything_made_in_forward_follows_the_inputs_device(arch):
    """Meta tensors stand in for a GPU on this CPU-only machine: sigma given as a CPU tensor and
    the label-dropout draw must land on the device of ``x``, or mixing them fails."""
    with torch.device("meta"):
        net = tiny_net(arch, label_dim=10, label_dropout=0.5).train()
    x = torch.zeros(2, 3, RES, RES, device="meta")
    out = net(x, torch.tensor([0.5, 2.0]), one_hot(2).to("meta"), torch.zeros(2, 9, device="meta"))
    assert out.device.type == "meta" and out.shape == x.shape


def test_channels_last_matches_contiguous(generator):
    net = tiny_net("ncsnpp", label_dim=10).eval()
    randomise_output_layer(net, generator)
    x = torch.randn(2, 3, RES, RES, generator=generator)
    sigma, labels = torch.tensor([0.3, 3.0]), one_hot(2)
    expected = net(x, sigma, labels)
    net = net.to(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last), sigma, labels)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_autocast_output_is_float32(generator):
    net = tiny_net("ddpmpp").eval()
    randomise_output_layer(net, generator)
    x = torch.randn(2, 3, RES, RES, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.tensor([0.5, 5.0]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net(x, torch.tensor([0.5, 5.0])), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_compiles_without_graph_breaks(generator):
    net = tiny_net("ncsnpp", label_dim=10, label_dropout=0.5, dropout=0.1).eval()
    randomise_output_layer(net, generator)
    x = torch.randn(2, 3, RES, RES, generator=generator)
    args = (x, torch.tensor([0.3, 3.0]), one_hot(2), torch.zeros(2, 9))
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), net(*args))


FILTER_MESSAGE = (
    "resample_filter must be a non-empty even-length sequence of positive taps "
    "(e.g. [1, 1] or [1, 3, 3, 1]), got "
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(arch="ddpm"), "arch must be one of ('ddpmpp', 'ncsnpp'), got 'ddpm'"),
        (
            dict(embedding_type="sinusoidal"),
            "embedding_type must be one of ('positional', 'fourier'), got 'sinusoidal'",
        ),
        (
            dict(encoder_type="skip"),
            "encoder_type must be one of ('standard', 'residual'), got 'skip'",
        ),
        (dict(decoder_type="skip"), "decoder_type must be one of ('standard',), got 'skip'"),
        (
            dict(img_resolution=10, channel_mult=[1, 2, 2]),
            "img_resolution must be a positive multiple of 2**(len(channel_mult) - 1) = 4, got 10",
        ),
        (
            dict(img_resolution=2, channel_mult=[1, 2, 2]),
            "img_resolution must be a positive multiple of 2**(len(channel_mult) - 1) = 4, got 2",
        ),
        (dict(channel_mult=[]), "channel_mult must list at least one level, got []"),
        (
            dict(img_resolution=12, channel_mult=[1, 1, 1, 1]),
            "img_resolution must be a positive multiple of 2**(len(channel_mult) - 1) = 8, got 12",
        ),
        (dict(num_blocks=-1), "num_blocks must be >= 0, got -1"),
        (dict(dropout=1.5), "dropout must be in [0, 1], got 1.5"),
        (dict(dropout=-0.1), "dropout must be in [0, 1], got -0.1"),
        (dict(label_dropout=1.01), "label_dropout must be in [0, 1], got 1.01"),
        (dict(resample_filter=[1]), FILTER_MESSAGE + "[1]"),
        (dict(resample_filter=[1, 0]), FILTER_MESSAGE + "[1, 0]"),
        (dict(resample_filter=[]), FILTER_MESSAGE + "[]"),
        (dict(sigma_data=0.0), "sigma_data must be > 0, got 0.0"),
        (dict(label_dim=-1), "label_dim must be >= 0, got -1"),
        (dict(augment_dim=-2), "augment_dim must be >= 0, got -2"),
    ],
)
def test_construction_errors_in_full(kwargs, message):
    kwargs = {"img_resolution": 16, **TINY, **kwargs}
    with pytest.raises(ValueError) as caught:
        EDMPrecond(img_channels=3, **kwargs)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_blocks=0),
        dict(dropout=1.0, label_dropout=1.0),
        dict(dropout=0.0, label_dropout=0.0),
        dict(img_resolution=4, channel_mult=[1, 2, 2], attn_resolutions=[]),
        dict(sigma_data=1e-3, label_dim=0, augment_dim=0),
        dict(arch="ncsnpp", resample_filter=[1, 5, 10, 10, 5, 1]),
    ],
)
def test_construction_boundaries_are_accepted(kwargs):
    kwargs = {"img_resolution": 16, **TINY, **kwargs}
    net = EDMPrecond(img_channels=3, **kwargs).eval()
    res = kwargs["img_resolution"]
    out = net(torch.zeros(1, 3, res, res), 1.0)
    assert out.shape == (1, 3, res, res)


def test_defaults_are_edms():
    net = EDMPrecond(8, 3, model_channels=8, channel_mult=[1], num_blocks=1)
    assert (net.label_dim, net.augment_dim, net.sigma_data) == (0, 9, 0.5)
    assert net.model.map_label is None
    assert net.model.map_augment.in_features == 9
    assert EDMPrecond(8, 3, augment_dim=0, **TINY).model.map_augment is None
    unet = SongUNet(8, 3, 3, **TINY)
    assert (unet.label_dim, unet.augment_dim) == (0, 0)
    assert unet.map_label is None and unet.map_augment is None
    sigma = torch.tensor([0.1, 2.0])
    for default, explicit in zip(preconditioning(sigma), preconditioning(sigma, 0.5), strict=True):
        torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    torch.testing.assert_close(
        PositionalEmbedding(4).freqs, torch.tensor([1.0, 1e-4]), rtol=0, atol=0
    )


def test_bad_forward_inputs_in_full():
    net = tiny_net("ddpmpp", label_dim=10)
    x, sigma = torch.zeros(2, 3, RES, RES), torch.ones(2)
    cases = [
        (
            lambda: net(torch.zeros(2, 1, RES, RES), sigma),
            f"x must have shape [N, 3, {RES}, {RES}], got (2, 1, {RES}, {RES})",
        ),
        (lambda: net(x, torch.ones(3)), "sigma must be a scalar or have shape [2], got (3,)"),
        (
            lambda: net(x, sigma, torch.zeros(2, 5)),
            "class_labels must have shape (2, 10), got (2, 5)",
        ),
        (
            lambda: net.model(x, sigma, None),
            "class_labels must have shape (2, 10), got None",
        ),
        (
            lambda: net(x, sigma, one_hot(2), torch.zeros(2, 4)),
            "augment_labels must be None or have shape (2, 9), got (2, 4)",
        ),
        (
            lambda: tiny_net("ddpmpp")(x, sigma, one_hot(2)),
            "class_labels must be None for an unconditional model (label_dim=0)",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as caught:
            call()
        assert str(caught.value) == message
