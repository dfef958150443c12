"""EDM sampler: schedule tables, ODE convergence on Gaussian data, NFE, seeding, churn, hooks."""

import itertools
import math

import numpy as np
import pytest
import torch

from aot_model import sampling
from aot_model.sampling import (
    MAX_GAMMA,
    churn_gammas,
    heun_sampler,
    latents_from_seeds,
    per_image_generators,
    sigma_steps,
)

# method-notes b.3: t_0 .. t_{N-1} to the printed precision. t_15 of (18, 7) is 0.0229345
# (40-digit mpmath), i.e. 0.02293; a transcription that printed 0.02294 was wrong.
SCHEDULE_TABLES = {
    (18, 7.0): "80, 57.586, 40.786, 28.375, 19.352, 12.910, 8.401, 5.315, 3.257, 1.923, 1.088, "
    "0.5853, 0.2964, 0.1395, 0.05995, 0.02293, 0.007528, 0.002",
    (14, 90.0): "80, 36.957, 16.959, 7.7295, 3.4986, 1.5725, 0.7017, 0.3109, 0.1367, 0.05965, "
    "0.02583, 0.01110, 0.004731, 0.002",
    (15, 72.0): "80, 39.438, 19.306, 9.3833, 4.5274, 2.1682, 1.0305, 0.4860, 0.2274, 0.1055, "
    "0.04858, 0.02217, 0.01003, 0.004500, 0.002",
}

# Gaussian data x ~ N(MU, diag(S²)) per dimension: its ideal denoiser is linear in x.
MU = torch.tensor([0.3, -0.2, 0.0, 0.1], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 0.1, 2.0], dtype=torch.float64)
MU_2 = MU + torch.tensor([1.0, -0.5, 0.2, 0.0], dtype=torch.float64)  # a second data mean


def gaussian_denoiser(x, sigma, class_labels=None, *, mu=MU):
    """D(x; σ) = μ + s²/(s² + σ²)·(x - μ), exact for Gaussian data (per dimension)."""
    sigma = sigma.double().reshape(-1, *[1] * (x.ndim - 1))
    return mu + S**2 / (S**2 + sigma**2) * (x.double() - mu)


def gaussian_ode_solution(x_start, sigma_start, sigma, *, mu=MU):
    """Probability-flow ODE dx/dσ = (x - D)/σ in closed form: x - μ ∝ sqrt(s² + σ²)."""
    return mu + (x_start - mu) * torch.sqrt((S**2 + sigma**2) / (S**2 + sigma_start**2))


def convergence_orders(error_at, step_counts=(17, 33, 65)):
    """log2 of the error ratio between successive step counts. N = 2^k + 1 halves every interval
    in u = σ^{1/ρ}, so the grids are nested and a p-th order method shows p."""
    errors = [error_at(n) for n in step_counts]
    return [math.log2(a / b) for a, b in itertools.pairwise(errors)]


class RecordingNet:
    """Gaussian denoiser that records every call's inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x.clone(), sigma.clone(), class_labels))
        return gaussian_denoiser(x, sigma)


def unit_latents(batch=6, dim=4, seed=0):
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(("num_steps", "rho"), list(SCHEDULE_TABLES))
def test_sigma_steps_match_methods_tables(num_steps, rho):
    """Eq. 5 against method-notes b.3's tables; (18, 7) is EDM's default schedule."""
    printed = SCHEDULE_TABLES[num_steps, rho].split(", ")
    t = sigma_steps(num_steps) if rho == 7.0 else sigma_steps(num_steps, rho=rho)
    assert len(printed) == num_steps and t.shape == (num_steps + 1,)
    for value, text in zip(t[:-1].tolist(), printed, strict=True):
        decimals = len(text.partition(".")[2])
        assert abs(value - float(text)) <= 0.5 * 10**-decimals + 1e-12, (value, text)


@pytest.mark.parametrize(("num_steps", "rho"), [(2, 7.0), (18, 7.0), (14, 90.0), (40, 1.0)])
def test_sigma_steps_endpoints_and_order(num_steps, rho):
    t = sigma_steps(num_steps, 0.01, 50.0, rho)
    assert t.dtype == torch.float64 and t.shape == (num_steps + 1,)
    assert t[0].item() == pytest.approx(50.0, rel=1e-14)
    assert t[-2].item() == pytest.approx(0.01, rel=1e-12)
    assert t[-1].item() == 0.0
    assert bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((5, 1.0, 5.0, 1.0), [5, 4, 3, 2, 1, 0]),  # ρ = 1: evenly spaced σ
        ((3, 1.0, 9.0, 2.0), [9, 4, 1, 0]),  # √σ = 3, 2, 1
        ((4, 1.0, 64.0, 3.0), [64, 27, 8, 1, 0]),  # ∛σ = 4, 3, 2, 1
    ],
)
def test_sigma_steps_hand_computed(args, expected):
    """Eq. 5 by hand: σ^{1/ρ} falls in equal steps from σ_max^{1/ρ} to σ_min^{1/ρ}, then t_N = 0."""
    assert sigma_steps(*args).tolist() == pytest.approx(expected, rel=1e-12, abs=0)


def test_sigma_steps_tend_to_log_uniform_as_rho_grows():
    """ρ → ∞ in Eq. 5: t_i → σ_max·(σ_min/σ_max)^{i/(N-1)}, a geometric sequence."""
    t = sigma_steps(6, 0.002, 80.0, rho=1e6)[:-1]
    geometric = 80.0 * (0.002 / 80.0) ** (torch.arange(6, dtype=torch.float64) / 5)
    torch.testing.assert_close(t, geometric, rtol=1e-4, atol=0)


def test_sigma_steps_dtype():
    assert sigma_steps(5, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_steps": 1}, "num_steps"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 4.0}, "num_steps"),
        ({"num_steps": True}, "num_steps"),
        ({"num_steps": 5, "sigma_min": 0.0}, "sigma_min"),
        ({"num_steps": 5, "sigma_min": 90.0}, "sigma_min"),
        ({"num_steps": 5, "sigma_max": math.inf}, "sigma_min and sigma_max"),
        ({"num_steps": 5, "sigma_min": 1.0, "sigma_max": 1.0}, "sigma_min and sigma_max"),
        ({"num_steps": 5, "rho": 0.0}, "rho"),
        ({"num_steps": 5, "rho": -7.0}, "rho"),
        ({"num_steps": 5, "rho": math.inf}, "rho"),
    ],
)
def test_sigma_steps_validation(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        sigma_steps(**kwargs)


# ----------------------------------------------------------------------------- ODE solver


@pytest.mark.parametrize(("solver", "order"), [("heun", 2.0), ("euler", 1.0)])
def test_converges_to_closed_form_at_expected_order(solver, order):
    """Gaussian data: x(σ) = μ + sqrt(s² + σ²)/sqrt(s² + σ_max²)·(x(σ_max) - μ) solves
    dx/dσ = (x - D)/σ; the global error at t_{N-1} = σ_min shrinks by 2^order as N doubles."""
    latents = unit_latents(batch=64)

    def error_at(num_steps):
        out = heun_sampler(
            gaussian_denoiser, latents, num_steps=num_steps, solver=solver, return_trajectory=True
        )
        sigma_max, sigma_min = out.sigmas[0], out.sigmas[num_steps - 1]
        exact = gaussian_ode_solution(latents.double() * sigma_max, sigma_max, sigma_min)
        return (out.xs[num_steps - 1].double() - exact).abs().max().item()

    observed = convergence_orders(error_at)
    assert all(abs(p - order) < 0.2 for p in observed), observed


def test_heun_with_many_steps_follows_the_closed_form_trajectory():
    """Algorithm 1 with N = 256: every x_i, the image x_N at σ = 0 included, is within 0.2% (of
    the marginal std sqrt(s² + t_i²)) of the exact x(t_i) = μ + sqrt((s² + t_i²)/(s² + σ_max²))
    ·(x_0 - μ)."""
    latents = unit_latents(batch=64)
    out = heun_sampler(gaussian_denoiser, latents, num_steps=256, return_trajectory=True)
    t = out.sigmas[:, None, None]
    exact = gaussian_ode_solution(latents.double() * out.sigmas[0], out.sigmas[0], t)
    error = (out.xs.double() - exact) / torch.sqrt(S**2 + t**2)
    assert error.abs().max().item() < 2e-3
    assert torch.equal(out.xs[-1], out.images)


def test_last_step_is_euler_to_the_denoised_value():
    """The Euler step to t_N = 0: x_{N-1} - t_{N-1}·(x_{N-1} - D)/t_{N-1} = D(x_{N-1}; t_{N-1})."""
    out = heun_sampler(gaussian_denoiser, unit_latents(), num_steps=6, return_trajectory=True)
    expected = gaussian_denoiser(out.xs[-2], out.sigmas[-2].expand(len(out.images)))
    torch.testing.assert_close(out.images, expected.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.images, out.denoised[-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("solver", "nfe"), [("heun", 2 * 7 - 1), ("euler", 7)])
def test_nfe_and_trajectory_shapes(solver, nfe):
    """NFE = 2N - 1 for Heun (method-notes b.2), N for Euler; x_0 = t_0·ε."""
    net = RecordingNet()
    latents = torch.randn(3, 2, 2, 4, generator=torch.Generator().manual_seed(1))
    out = heun_sampler(net, latents, num_steps=7, solver=solver, return_trajectory=True)
    assert out.nfe == nfe == len(net.calls)
    assert out.images.dtype == torch.float32 and out.images.shape == latents.shape
    assert out.sigmas.dtype == torch.float64 and out.sigmas.shape == (8,)
    assert out.xs.shape == (8, *latents.shape) and out.denoised.shape == (7, *latents.shape)
    assert torch.equal(out.xs[-1], out.images)
    assert torch.equal(out.xs[0], (latents.double() * 80.0).float())
    plain = heun_sampler(net, latents, num_steps=7, solver=solver)
    assert plain.xs is None and plain.denoised is None
    assert torch.equal(plain.images, out.images)


def test_net_sees_float32_state_sigma_vector_and_labels():
    """Algorithm 1 evaluates D at t_i (predictor) and t_{i+1} (corrector), except into t_N = 0."""
    net = RecordingNet()
    labels = torch.eye(3)[[0, 2, 1, 1]]
    out = heun_sampler(net, unit_latents(batch=4), labels, num_steps=4)
    t = out.sigmas.float()
    # Predictor at t_i, corrector at t_{i+1}; the last step (t_3 -> 0) has no corrector.
    visited = [t[0], t[1], t[1], t[2], t[2], t[3], t[3]]
    for (x, sigma, seen_labels), t_i in zip(net.calls, visited, strict=True):
        assert x.dtype == torch.float32 and sigma.dtype == torch.float32
        assert sigma.shape == (4,) and bool((sigma == t_i).all())
        assert seen_labels is labels


# ----------------------------------------------------------------------------- seeds


def test_latents_follow_per_seed_generator_convention():
    """generate.py (method-notes b.8): image k's generator is seeded with seeds[k] % 2**32, and
    draws its latent randn(shape), then its label randint(label_dim)."""
    latents, labels = latents_from_seeds([5, 11, 2**32 + 5], (2, 3), label_dim=10)
    for k, seed in enumerate([5, 11]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(latents[k], torch.randn(2, 3, generator=g))
        assert labels[k].argmax().item() == torch.randint(10, (), generator=g).item()
    assert torch.equal(latents[2], latents[0]) and torch.equal(labels[2], labels[0])
    assert latents.dtype == labels.dtype == torch.float32
    assert torch.equal(labels.sum(1), torch.ones(3))
    assert latents_from_seeds([5], (4,))[1] is None


def test_latents_independent_of_batch_composition():
    seeds = list(range(8))
    latents, labels = latents_from_seeds(seeds, (4,), label_dim=3)
    halves = [latents_from_seeds(half, (4,), label_dim=3) for half in (seeds[:4], seeds[4:])]
    assert torch.equal(torch.cat([z for z, _ in halves]), latents)
    assert torch.equal(torch.cat([c for _, c in halves]), labels)
    perm = [3, 7, 0, 5, 1, 6, 2, 4]
    permuted, permuted_labels = latents_from_seeds(perm, (4,), label_dim=3)
    assert torch.equal(permuted, latents[perm]) and torch.equal(permuted_labels, labels[perm])


@pytest.mark.parametrize("S_churn", [0.0, 2.0])
def test_images_independent_of_batch_composition(S_churn):
    """EDM's per-image seeding: image k depends on seeds[k] only, not on its batch."""

    def sample(seeds):
        latents, _ = latents_from_seeds(seeds, (4,))
        gens = per_image_generators(seeds, stream=1)
        return heun_sampler(
            gaussian_denoiser, latents, num_steps=5, S_churn=S_churn, generator=gens
        ).images

    seeds, perm = list(range(8)), [3, 7, 0, 5, 1, 6, 2, 4]
    full = sample(seeds)
    assert torch.equal(torch.cat([sample(seeds[:4]), sample(seeds[4:])]), full)
    assert torch.equal(sample(perm), full[perm])


def test_per_image_generator_streams():
    """Stream 0 is generate.py's, manual_seed(seed % 2**32) (method-notes b.8; the modulo matters
    on CUDA generators, CPU ones keep 32 bits anyway); stream 1 is another reproducible stream."""
    seeds = [g.initial_seed() for g in per_image_generators([3, 2**32 + 3, 2**64 - 1])]
    assert seeds == [3, 3, 2**32 - 1]
    base = per_image_generators([3, 4])
    churn = per_image_generators([3, 4], stream=1)
    again = per_image_generators([3, 4], stream=1)
    draws = [[torch.randn(5, generator=g) for g in gens] for gens in (base, churn, again)]
    assert torch.equal(draws[0][0], torch.randn(5, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(draws[0][0], draws[1][0])  # stream 1 does not replay the latent
    assert not torch.equal(draws[1][0], draws[1][1])
    assert torch.equal(draws[1][0], draws[2][0]) and torch.equal(draws[1][1], draws[2][1])


@pytest.mark.parametrize("seeds", [[], [-1], [2**64]])
def test_latents_from_seeds_validation(seeds):
    with pytest.raises(ValueError, match=r"^seeds "):
        latents_from_seeds(seeds, (4,))


def test_per_image_generators_rejects_negative_stream():
    with pytest.raises(ValueError, match="stream"):
        per_image_generators([0], stream=-1)


# ----------------------------------------------------------------------------- churn


def test_churn_gammas_clip_and_window():
    sigmas = [80.0, 10.0, 1.0, 0.1, 0.01]
    assert churn_gammas(sigmas, 1.0) == [0.2] * 5
    assert churn_gammas(sigmas, 1000.0) == [MAX_GAMMA] * 5
    assert math.isclose(MAX_GAMMA, math.sqrt(2) - 1)
    assert churn_gammas(sigmas, 1.0, S_min=0.1, S_max=10.0) == [0.0, 0.2, 0.2, 0.2, 0.0]
    assert churn_gammas(sigmas, 0.0) == [0.0] * 5


def test_zero_churn_is_bit_identical_and_draws_nothing(generator):
    latents = unit_latents()
    plain = heun_sampler(gaussian_denoiser, latents, num_steps=6)
    state = generator.get_state()
    for kwargs in (
        {"S_churn": 0.0},
        {"S_churn": 50.0, "S_max": 0.001},
        {"S_churn": 50.0, "S_min": 81},
    ):
        out = heun_sampler(gaussian_denoiser, latents, num_steps=6, generator=generator, **kwargs)
        assert torch.equal(out.images, plain.images), kwargs
    assert torch.equal(generator.get_state(), state)


def test_churn_changes_results_and_is_reproducible():
    latents = unit_latents()

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return heun_sampler(gaussian_denoiser, latents, num_steps=6, S_churn=3.0, generator=g)

    plain = heun_sampler(gaussian_denoiser, latents, num_steps=6)
    assert not torch.allclose(sample(0).images, plain.images)
    assert torch.equal(sample(0).images, sample(0).images)
    assert not torch.equal(sample(0).images, sample(1).images)


@pytest.mark.parametrize(("S_churn", "gamma"), [(0.8, 0.1), (100.0, MAX_GAMMA)])
def test_churn_raises_the_noise_level_and_adds_matching_noise(S_churn, gamma):
    """Algorithm 2 (method-notes b.3), N = 8: inside [S_min, S_max] the network sees
    t̂ = (1 + γ)·t_i with γ = min(S_churn/8, √2 - 1), at x̂ = x_i + S_noise·sqrt(t̂² - t_i²)·ε;
    outside it sees (x_i, t_i)."""
    net, S_noise = RecordingNet(), 1.5
    out = heun_sampler(
        net,
        unit_latents(batch=4096),
        num_steps=8,
        solver="euler",  # one network call per step: call i is step i's
        S_churn=S_churn,
        S_min=0.5,
        S_max=20.0,
        S_noise=S_noise,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
    )
    inside = [0.5 <= t <= 20.0 for t in out.sigmas[:-1].tolist()]
    assert any(inside) and not all(inside)
    for i, (x_hat, t_hat, _) in enumerate(net.calls):
        t_i = out.sigmas[i].item()
        raised = (1 + gamma) * t_i if inside[i] else t_i
        assert t_hat.tolist() == pytest.approx([raised] * len(x_hat), rel=1e-6)
        added = (x_hat - out.xs[i]).double()
        if inside[i]:
            std = added.std().item() / (S_noise * t_i * math.sqrt((1 + gamma) ** 2 - 1))
            assert abs(std - 1) < 0.03, (i, std)
        else:
            assert torch.equal(added, torch.zeros_like(added))


def test_churn_keeps_the_marginals_of_gaussian_data():
    """With the exact denoiser and S_noise = 1, Algorithm 2 keeps x_i ~ N(μ, s² + t_i²) at every
    level: the noise lifts the variance to s² + t̂², the ODE step from t̂ brings it to s² + t_{i+1}².
    Checked on 16384 samples, N = 64, maximal churn (γ = √2 - 1) on [0.05, 50]: std within 10%."""
    out = heun_sampler(
        gaussian_denoiser,
        unit_latents(batch=16384),
        num_steps=64,
        S_churn=1000.0,
        S_min=0.05,
        S_max=50.0,
        generator=torch.Generator().manual_seed(1),
        return_trajectory=True,
    )
    std = out.xs.double().std(dim=1) / torch.sqrt(S**2 + out.sigmas[:, None] ** 2)
    assert (std - 1).abs().max().item() < 0.1


# ----------------------------------------------------------------------------- correction hook


def test_zero_correction_is_bit_identical():
    latents = unit_latents()
    plain = heun_sampler(gaussian_denoiser, latents, num_steps=6)
    out = heun_sampler(
        gaussian_denoiser, latents, num_steps=6, correction=lambda x, s, c: torch.zeros_like(x)
    )
    assert torch.equal(out.images, plain.images)
    skipped = heun_sampler(
        gaussian_denoiser, latents, num_steps=6, correction=lambda x, s, c: None, correct_heun=True
    )
    assert torch.equal(skipped.images, plain.images) and skipped.corrections == 0


def test_correction_cancelling_d_freezes_euler_state():
    def minus_d(x, sigma, class_labels):
        assert class_labels is None
        assert x.dtype == sigma.dtype == torch.float32 and sigma.shape == (len(x),)
        return -(x.double() - gaussian_denoiser(x, sigma)) / sigma.double()[:, None]

    latents = unit_latents()
    out = heun_sampler(gaussian_denoiser, latents, num_steps=5, solver="euler", correction=minus_d)
    torch.testing.assert_close(out.images, (latents.double() * 80.0).float(), rtol=1e-5, atol=1e-4)


def toward_mu_2(x, sigma, class_labels):
    """c = (D - D₂)/σ, with D₂ the denoiser of N(MU_2, S²): d + c = (x - D₂)/σ."""
    shift = gaussian_denoiser(x, sigma) - gaussian_denoiser(x, sigma, mu=MU_2)
    return shift / sigma.double()[:, None]


@pytest.mark.parametrize(
    ("correct_heun", "mu", "order", "corrections"),
    [(True, MU_2, 2.0, 2 * 65 - 1), (False, (MU + MU_2) / 2, 1.0, 65)],
)
def test_correction_converges_to_the_corrected_ode(correct_heun, mu, order, corrections):
    """method-notes g.4: a correction in both Heun directions is followed at full weight (here:
    the ODE of N(MU_2, S²), second order); in the Euler direction only, Heun's average follows it
    at half weight (the ODE of N((MU + MU_2)/2, S²), first order)."""
    latents = unit_latents(batch=8)
    counts = []

    def error_at(num_steps):
        out = heun_sampler(
            gaussian_denoiser,
            latents,
            num_steps=num_steps,
            correction=toward_mu_2,
            correct_heun=correct_heun,
            return_trajectory=True,
        )
        counts.append(out.corrections)
        sigma_max, sigma_min = out.sigmas[0], out.sigmas[num_steps - 1]
        exact = gaussian_ode_solution(latents.double() * sigma_max, sigma_max, sigma_min, mu=mu)
        return (out.xs[num_steps - 1].double() - exact).abs().max().item()

    observed = convergence_orders(error_at, (65, 129, 257))
    assert all(abs(p - order) < 0.2 for p in observed), observed
    assert counts[0] == corrections


# ----------------------------------------------------------------------------- validation


def refusing_net(*args):
    raise AssertionError("the sampler called the network before validating its input")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"solver": "rk4"}, "solver"),
        ({"num_steps": 1}, "num_steps"),
        ({"sigma_min": -1.0}, "sigma_min"),
        ({"rho": 0.0}, "rho"),
        ({"S_churn": -1.0}, "S_churn"),
        ({"S_churn": math.inf}, "S_churn"),
        ({"S_min": 2.0, "S_max": 1.0}, "S_min"),
        ({"S_noise": -0.5}, "S_noise"),
        ({"S_noise": math.inf}, "S_noise"),
        ({"generator": [torch.Generator()]}, "generator"),
        ({"generator": [0, 1, 2, 3, 4, 5]}, "generator"),
        ({"generator": 0}, "generator"),
        ({"class_labels": torch.zeros(5, 3)}, "class_labels"),
        ({"latents": torch.zeros(6)}, "latents"),
        ({"latents": torch.zeros(6, 4, dtype=torch.int64)}, "latents"),
    ],
)
def test_sampler_validation(kwargs, name):
    kwargs = {"latents": unit_latents(), **kwargs}
    with pytest.raises(ValueError, match=f"^{name}[ :]"):
        heun_sampler(refusing_net, **kwargs)


def test_churn_noise_is_float64_from_the_given_generator():
    noise = sampling._randn(torch.Size([2, 3]), torch.Generator().manual_seed(5), "cpu")
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert noise.dtype == torch.float64 and torch.equal(noise, expected)
    rows = sampling._randn(torch.Size([2, 3]), per_image_generators([5, 6]), "cpu")
    assert rows.dtype == torch.float64 and torch.equal(rows[0], expected[0])


# Recorded stream-1 seeds (NumPy SeedSequence(seed, spawn_key=(1,)), 64-bit state): a change
# would silently change every stochastic sample drawn with per-image churn generators.
STREAM_1_SEEDS = {
    0: 4881901421217228719,
    7: 4042502035264064771,
    2**40 + 3: 17443615573750325651,
    2**64 - 1: 15591386231082554480,
}


def test_stream_seeds_match_recorded_values():
    gens = per_image_generators(list(STREAM_1_SEEDS), stream=1)
    assert [g.initial_seed() for g in gens] == list(STREAM_1_SEEDS.values())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sigma_steps(1), "num_steps must be an int >= 2 (N = 1 divides by N - 1), got 1"),
        (
            lambda: latents_from_seeds(range(-7, 0), (4,)),
            "seeds must be ints in [0, 2**64), got [-7, -6, -5, -4, -3]",
        ),
        (
            lambda: heun_sampler(refusing_net, torch.zeros(6)),
            "latents must be a floating-point tensor of shape [B, ...] with ndim >= 2",
        ),
        (
            lambda: heun_sampler(refusing_net, unit_latents(), generator=0),
            "generator must be None, a torch.Generator or a sequence of 6 generators "
            "(one per image), got int",
        ),
        (
            lambda: heun_sampler(refusing_net, unit_latents(), generator=list(range(6))),
            "generator: every element of the sequence must be a torch.Generator",
        ),
    ],
)
def test_error_messages_in_full(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_sigma_steps_accepts_numpy_integers():
    assert torch.equal(sigma_steps(np.int64(5)), sigma_steps(5))


def test_outputs_land_on_the_requested_device():
    # The meta device exists on every machine, so a dropped device argument shows without a GPU.
    meta = torch.device("meta")
    assert sigma_steps(5, device=meta).device == meta
    latents, labels = latents_from_seeds([0, 1], (3,), label_dim=2, device=meta)
    assert latents.device == meta and labels.device == meta
    for generator in (None, torch.Generator(), per_image_generators([0, 1])):
        assert sampling._randn(torch.Size([2, 3]), generator, meta).device == meta


def test_churn_noise_without_generator_comes_from_torch_global_rng():
    with torch.random.fork_rng():
        torch.manual_seed(11)
        noise = sampling._randn(torch.Size([2, 3]), None, "cpu")
        torch.manual_seed(11)
        expected = torch.randn(2, 3, dtype=torch.float64)
    assert noise.dtype == torch.float64 and torch.equal(noise, expected)


def test_latents_from_seeds_edge_sizes():
    latents, _ = latents_from_seeds([0], (1, 4))
    assert torch.equal(latents[0], torch.randn(1, 4, generator=torch.Generator().manual_seed(0)))
    _, labels = latents_from_seeds([0, 1], (2,), label_dim=1)
    assert torch.equal(labels, torch.ones(2, 1))


def test_churn_window_of_one_level_and_noise_scale_bounds():
    t = sigma_steps(4)[1].item()
    common = {"num_steps": 4, "S_churn": 1.0}
    plain = heun_sampler(gaussian_denoiser, unit_latents(), num_steps=4).images
    one_level = heun_sampler(
        gaussian_denoiser, unit_latents(), S_min=t, S_max=t, generator=torch.Generator(), **common
    ).images
    assert not torch.equal(one_level, plain)  # S_min == S_max churns at exactly that level
    silent = [
        heun_sampler(
            gaussian_denoiser,
            unit_latents(),
            S_noise=0.0,
            generator=torch.Generator().manual_seed(seed),
            **common,
        ).images
        for seed in (0, 1)
    ]
    assert torch.equal(*silent)  # S_noise = 0: t is raised but no noise is added
    half = heun_sampler(gaussian_denoiser, unit_latents(), S_noise=0.5, **common).images
    assert torch.isfinite(half).all()


def test_fast_net_runs_the_network_in_bf16_autocast_and_channels_last():
    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x, sigma, class_labels=None):
            seen.append(
                (
                    torch.is_autocast_enabled("cpu"),
                    x.is_contiguous(memory_format=torch.channels_last),
                )
            )
            return self.conv(x)

    torch.manual_seed(0)
    net = Net()
    x, sigma = torch.randn(3, 2, 5, 5), torch.ones(3)
    expected = net(x, sigma)
    out = sampling.fast_net(net)(x, sigma)
    assert seen[-1] == (True, True) and out.dtype == torch.float32
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)  # bf16: 8 mantissa bits
    assert not torch.equal(out, expected)
    sampling.fast_net(net, bf16=False, channels_last=False)(x, sigma)
    assert seen[-1] == (False, False)


def test_fast_net_evaluates_the_network_on_the_samplers_arguments():
    seen = []

    def net(x, sigma, class_labels=None):
        seen.append((x, sigma, class_labels, torch.get_autocast_dtype("cpu")))
        assert torch.is_autocast_enabled("cpu")
        return x.to(torch.bfloat16)

    x, sigma, labels = torch.ones(2, 1, 4, 4), torch.tensor([1.0, 2.0]), torch.eye(2)
    default = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)  # so that bf16 must be asked for by name
    try:
        out = sampling.fast_net(net, bf16=True, channels_last=False)(x, sigma, labels)
    finally:
        torch.set_autocast_dtype("cpu", default)
    ((got_x, got_sigma, got_labels, dtype),) = seen
    assert got_x is x and got_sigma is sigma and got_labels is labels
    assert dtype == torch.bfloat16 and out.dtype == torch.float32


def test_latents_for_a_gpu_are_drawn_there(monkeypatch):
    """EDM's generate.py draws each image's latent and label with a generator on the GPU; torch
    stand-ins record the device each draw is asked for (no GPU here)."""
    cuda, asked = torch.device("cuda", 0), []

    def generators(seeds, device=None):
        asked.append(("generators", device))
        return [torch.Generator().manual_seed(s) for s in seeds]

    def recording(name, real):
        def call(*args, device=None, **kwargs):
            asked.append((name, device))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(sampling, "per_image_generators", generators)
    for name in ("randn", "randint", "eye"):
        monkeypatch.setattr(torch, name, recording(name, getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: self)
    latents, labels = sampling.latents_from_seeds([3, 4], (1, 2, 2), label_dim=5, device=cuda)
    assert latents.shape == (2, 1, 2, 2) and labels.shape == (2, 5)
    expected = [("generators", cuda), *[("randn", cuda), ("randint", cuda)] * 2, ("eye", cuda)]
    assert asked == expected


def test_noise_is_drawn_where_each_generator_lives(monkeypatch):
    """A CUDA generator draws on its GPU (torch refuses a generator of another device); a
    stand-in torch.randn records the device each draw is asked for."""
    asked, real = [], torch.randn

    def randn(*args, device=None, **kwargs):
        asked.append(device)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    one, many = torch.Generator(), per_image_generators([1, 2])
    sampling._randn(torch.Size([2, 3]), one, "cpu")
    sampling._randn(torch.Size([2, 3]), many, "cpu")
    assert asked == [one.device, many[0].device, many[1].device]


def test_per_image_generators_live_on_the_device_asked(monkeypatch):
    asked, real = [], torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: asked.append(device) or real())
    assert len(per_image_generators([1, 2], device="cpu")) == 2
    assert asked == ["cpu", "cpu"]
