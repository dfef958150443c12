"""EDM sampler: time-step schedule, deterministic Heun / Euler ODE solver and stochastic churn.

Follows Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"):

* time steps, Eq. 5: ``t_i = (σ_max^{1/ρ} + i/(N-1)·(σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ`` for ``i < N``
  and ``t_N = 0``;
* the probability-flow ODE with σ(t) = t, s(t) = 1: ``dx/dσ = (x - D(x; σ)) / σ``;
* Algorithm 1 (deterministic Heun, the step to ``t_N = 0`` is Euler only, NFE = 2N - 1);
* Algorithm 2 (churn: before each step, raise the noise level to ``t̂ = (1 + γ_i)·t_i`` by adding
  fresh noise, ``γ_i = min(S_churn/N, √2 - 1)`` inside ``[S_min, S_max]``).

The solver state is float64 as in the reference code; the network sees float32.
Per-image seeding follows the EDM convention: image k's latent (and label) come from a generator
seeded with ``seeds[k]`` alone, so images do not depend on batch size or composition.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from aot_model.checks import check_choice, check_int

SOLVERS = ("heun", "euler")
MAX_GAMMA = math.sqrt(2.0) - 1.0  # Algorithm 2's cap: t̂ never exceeds √2·t_i

Net = Callable[[Tensor, Tensor, Tensor | None], Tensor]
Correction = Callable[[Tensor, Tensor, Tensor | None], Tensor | None]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


class SamplerOutput(NamedTuple):
    """Result of :func:`heun_sampler`; its tensors are float32 but ``sigmas``."""

    images: Tensor  # the samples x_N at t_N = 0, shaped like the latents [B, ...]
    nfe: int  # network evaluations actually made
    sigmas: Tensor  # float64 [N + 1]: the time steps t_0..t_N used (t_N = 0)
    # With return_trajectory, else None: x_i at every t_i, [N + 1, B, ...] (xs[0] = t_0·latents,
    # xs[N] == images), and D(x̂_i; t̂_i) at the start of every step, [N, B, ...] (x̂ = x and t̂ = t
    # without churn).
    xs: Tensor | None
    denoised: Tensor | None
    # Calls of the ``correction`` hook that returned a correction (for discriminator guidance:
    # discriminator forward + backward passes per image), reported beside ``nfe``.
    corrections: int = 0


def sigma_steps(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """EDM time steps (Karras et al. 2022, Eq. 5) ``t_0 = sigma_max > ... > t_{N-1} = sigma_min``,
    then ``t_N = 0``: ``[N + 1]``, evaluated in float64, returned in ``dtype`` on ``device``.

    N = ``num_steps`` >= 2 noise levels above zero (N = 1 would divide by N - 1 = 0). A larger
    ``rho`` > 0 puts more steps near sigma_min (rho -> inf is log-uniform spacing).
    """
    num_steps = check_int("num_steps", num_steps, 2, numpy=True, reason="N = 1 divides by N - 1")
    if not 0.0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(
            f"sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max < inf, "
            f"got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    if not 0.0 < rho < math.inf:
        raise ValueError(f"rho must be a finite number > 0, got rho={rho}")
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    t = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([t, t.new_zeros(1)]).to(dtype=dtype, device=device)


@torch.no_grad()
def heun_sampler(
    net: Net,
    latents: Tensor,
    class_labels: Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    return_trajectory: bool = False,
    generator: GeneratorArg = None,
    correction: Correction | None = None,
    correct_heun: bool = False,
) -> SamplerOutput:
    """Sample with EDM's Algorithm 1 (deterministic) or Algorithm 2 (``S_churn > 0``).

    Parameters
    ----------
    net : callable
        ``net(x, sigma, class_labels) -> D(x; sigma)`` with x float32 ``[B, ...]`` and sigma float32
        ``[B]`` on the latents' device; the output is cast to float64.
    latents : Tensor ``[B, ...]``
        Unit Gaussian noise; the sampler scales it by t_0 = sigma_max.
    class_labels : Tensor ``[B, label_dim]`` or None
        Passed through to ``net`` unchanged.
    num_steps, sigma_min, sigma_max, rho
        The schedule, see :func:`sigma_steps`.
    solver : {"heun", "euler"}
        "heun": 2nd order, NFE = 2N - 1 (the last step, to t_N = 0, is Euler). "euler": NFE = N.
    S_churn, S_min, S_max, S_noise : float
        Algorithm 2: at steps with ``S_min <= t_i <= S_max``, ``γ = min(S_churn/N, √2 - 1)``, and
        noise of std ``S_noise·sqrt(t̂² - t_i²)`` is added. ``S_churn = 0`` is deterministic.
    return_trajectory : bool
        Also return ``xs`` ``[N + 1, B, ...]`` and ``denoised`` ``[N, B, ...]`` (float32).
    generator : torch.Generator, sequence of B generators, or None
        Source of the churn noise (only drawn at steps with γ > 0). One generator makes a batch
        reproducible; a list with one generator per image makes image k depend on
        ``generator[k]`` only (batch-independent), e.g. ``per_image_generators(seeds, stream=1)``.
        None uses torch's global RNG. Noise is drawn in float64 on each generator's device.
        (EDM's ``generate.py`` instead continues each seed's latent generator and draws at every
        step, so stochastic samples match it in distribution, not bit for bit.)
    correction : callable or None
        ``correction(x̂, t̂, class_labels) -> Tensor or None`` (x̂ float32 ``[B, ...]``, t̂ float32
        ``[B]``), added to the first-order direction d_i = (x̂ - D)/t̂ (the hook discriminator
        guidance uses, :class:`aot_model.guidance.Guidance`). None means no correction at this
        step. Runs under ``torch.no_grad``; a hook that needs gradients must enable them itself.
        Not counted in ``nfe``; calls that return a tensor are counted in ``corrections``.
    correct_heun : bool
        Also apply ``correction`` to the Heun corrector's direction d' at (x_{i+1}, t_{i+1}).
    """
    _check_sampler_args(latents, class_labels, solver, S_churn, S_min, S_max, S_noise, generator)
    batch = latents.shape[0]
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    gammas = churn_gammas(t_steps[:-1].tolist(), S_churn, S_min, S_max)
    nfe = corrections = 0

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return net(x.to(torch.float32), t.to(torch.float32).repeat(batch), class_labels).double()

    def corrected(d: Tensor, x: Tensor, t: Tensor) -> Tensor:
        nonlocal corrections
        if correction is None:
            return d
        c = correction(x.to(torch.float32), t.to(torch.float32).repeat(batch), class_labels)
        if c is None:
            return d
        corrections += 1
        return d + c.double()

    x_next = latents.to(torch.float64) * t_steps[0]
    xs, denoised = [x_next.float()], []
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        x_hat, t_hat = x_next, t_cur
        if gammas[i] > 0:  # no draw at γ = 0, so S_churn = 0 is bit-identical to Algorithm 1
            t_hat = t_cur + gammas[i] * t_cur
            noise = _randn(x_next.shape, generator, x_next.device)
            x_hat = x_next + (t_hat**2 - t_cur**2).sqrt() * S_noise * noise
        x0_hat = denoise(x_hat, t_hat)
        d_cur = corrected((x_hat - x0_hat) / t_hat, x_hat, t_hat)
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:  # no corrector into t_N = 0 (d' divides by t)
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            if correct_heun:
                d_prime = corrected(d_prime, x_next, t_next)
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if return_trajectory:
            xs.append(x_next.float())
            denoised.append(x0_hat.float())
    trajectory = (torch.stack(xs), torch.stack(denoised)) if return_trajectory else (None, None)
    return SamplerOutput(x_next.to(torch.float32), nfe, t_steps, *trajectory, corrections)


def fast_net(net: torch.nn.Module, *, bf16: bool = True, channels_last: bool = True) -> Net:
    """Opt-in fast path for sampling: ``net`` in bf16 autocast and/or channels-last memory format.

    Returns a callable for `heun_sampler` (``net`` itself is converted to channels-last in place).
    The sampler's own arithmetic stays float64; only the network evaluations lose precision, so
    samples differ slightly from fp32 ones (measure the score difference before trusting a sweep
    to it: docs/benchmarks.md). The default path stays fp32, as EDM sampled; the pipeline takes
    this path with ``sweep.precision: bf16``.
    """
    if channels_last:
        net.to(memory_format=torch.channels_last)

    def fast(x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            return net(x, sigma, class_labels).float()

    return fast


def churn_gammas(
    sigmas: Sequence[float], S_churn: float, S_min: float = 0.0, S_max: float = float("inf")
) -> list[float]:
    """Algorithm 2's per-step churn γ_i = min(S_churn/N, √2 - 1) if S_min <= t_i <= S_max else 0,
    for the N noise levels ``sigmas`` = t_0..t_{N-1} (without the final 0)."""
    gamma = min(S_churn / len(sigmas), MAX_GAMMA)
    return [gamma if S_min <= t <= S_max else 0.0 for t in sigmas]


def _randn(shape: torch.Size, generator: GeneratorArg, device: torch.device) -> Tensor:
    """Float64 unit Gaussian noise; with one generator per image, row k comes from generator k."""
    if generator is None:
        return torch.randn(shape, dtype=torch.float64, device=device)

    def draw(size: torch.Size, g: torch.Generator) -> Tensor:
        return torch.randn(size, generator=g, dtype=torch.float64, device=g.device).to(device)

    if isinstance(generator, torch.Generator):
        return draw(shape, generator)
    return torch.stack([draw(shape[1:], g) for g in generator])


def per_image_generators(
    seeds: Sequence[int], *, stream: int = 0, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per seed (ints in [0, 2**64)); image k's random numbers then depend on
    ``seeds[k]`` alone. CPU streams are identical on every machine.

    ``stream`` 0 seeds generator k with ``seeds[k] % 2**32`` (the stream :func:`latents_from_seeds`
    draws from: EDM's ``generate.py`` seeds its StackedRandomGenerator so, method-notes b.8, and
    seeds k and k + 2**32 give the same image there and here). Stream s > 0 seeds it with a NumPy
    ``SeedSequence`` hash of ``(seeds[k], s)``, an independent stream for the same seed, e.g. for
    churn noise that must not replay the latent.
    """
    seeds = [operator.index(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must be a non-empty sequence of ints in [0, 2**64)")
    bad = [s for s in seeds if not 0 <= s < 2**64]
    if bad:
        raise ValueError(f"seeds must be ints in [0, 2**64), got {bad[:5]}")
    stream = operator.index(stream)
    if stream < 0:
        raise ValueError(f"stream must be an int >= 0, got stream={stream}")
    if stream > 0:
        seeds = [
            int(np.random.SeedSequence(s, spawn_key=(stream,)).generate_state(1, np.uint64)[0])
            for s in seeds
        ]
    else:
        seeds = [s % 2**32 for s in seeds]
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def latents_from_seeds(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    label_dim: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-image latents and random class labels, as EDM's ``generate.py`` draws them.

    Image k uses a generator seeded with ``seeds[k] % 2**32`` only: first its latent
    ``randn(shape)``, then (if ``label_dim > 0``) its label ``randint(label_dim)``; the result
    does not depend on batch size or batch order. Like ``generate.py`` (method-notes b.8) the
    generators live on the sampling device when it is a GPU: the same seeds then give the same
    latents as ``generate.py`` on the same device kind, and CUDA latents differ from CPU ones
    (another generator). Anywhere else they are CPU generators, identical on every machine.

    Returns latents, float32 ``[B, *shape]`` (``shape`` of one latent, e.g. ``(3, 32, 32)``), and
    class labels, float32 one-hot ``[B, label_dim]``, or None when ``label_dim == 0``
    (unconditional); both on ``device``.
    """
    device = torch.device("cpu" if device is None else device)
    where = device if device.type == "cuda" else torch.device("cpu")
    latents, labels = [], []
    for g in per_image_generators(seeds, device=where):
        latents.append(torch.randn(shape, generator=g, device=where))
        if label_dim > 0:
            labels.append(torch.randint(label_dim, (), generator=g, device=where))
    latents = torch.stack(latents).to(device)
    if label_dim == 0:
        return latents, None
    return latents, torch.eye(label_dim, device=where)[torch.stack(labels)].to(device)


def _check_sampler_args(
    latents: Tensor,
    class_labels: Tensor | None,
    solver: str,
    S_churn: float,
    S_min: float,
    S_max: float,
    S_noise: float,
    generator: GeneratorArg,
) -> None:
    """Reject bad sampler input before any network call. Its own function because `make mutants`
    makes no mutants inside heun_sampler: checks inlined there would go unmeasured."""
    if not isinstance(latents, Tensor) or latents.ndim < 2 or not latents.is_floating_point():
        raise ValueError("latents must be a floating-point tensor of shape [B, ...] with ndim >= 2")
    batch = latents.shape[0]
    if class_labels is not None and (
        not isinstance(class_labels, Tensor) or class_labels.shape[0] != batch
    ):
        raise ValueError(
            f"class_labels must be None or a tensor [B, label_dim] with B = {batch} like latents"
        )
    check_choice("solver", solver, SOLVERS)
    if not 0.0 <= S_churn < math.inf:
        raise ValueError(f"S_churn must be a finite number >= 0, got S_churn={S_churn}")
    if not 0.0 <= S_min <= S_max:
        raise ValueError(f"S_min and S_max must satisfy 0 <= S_min <= S_max, got {S_min}, {S_max}")
    if not 0.0 <= S_noise < math.inf:
        raise ValueError(f"S_noise must be a finite number >= 0, got S_noise={S_noise}")
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, Sequence) or len(generator) != batch:
        raise ValueError(
            f"generator must be None, a torch.Generator or a sequence of {batch} generators "
            f"(one per image), got {type(generator).__name__}"
        )
    if not all(isinstance(g, torch.Generator) for g in generator):
        raise ValueError("generator: every element of the sequence must be a torch.Generator")
