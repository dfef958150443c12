"""Discriminator Guidance (Kim et al. 2023, "Refining Generative Process with Discriminator
Guidance").

A noise-aware discriminator d(x; sigma) separates diffused real images from diffused generated ones;
at its optimum d / (1 - d) = p_data / p_model at that noise level, so
``grad_x log(d / (1 - d))`` estimates the gap between the data score and the model's score, and the
sampler follows the corrected score ``s + w * grad log(d / (1 - d))`` (method-notes g.1).

The discriminator (method-notes g.2) is a frozen noise-aware feature extractor (ADM's encoder
U-Net, :mod:`aot_model.adm`: DG's 32x32 classifier from a user-supplied checkpoint, or one this
project trains on its own data with :func:`train_noise_classifier`) plus a small trainable head on
its middle-block features that pools to one logit. Both see DG's variance-preserving input: EDM's
``x = y + sigma * n`` is scaled by ``alpha = 1 / sqrt(1 + sigma^2)`` and the noise level enters as
VP time ``tau(sigma)`` (beta_min 0.1, beta_max 20) times 999.

Training (:func:`train_discriminator`, method-notes g.3): real label 1, generated label 0, binary
cross-entropy, sigma log-uniform on [1e-3, 152] (DG's importance-sampled VP time in EDM terms),
Adam (lr 3e-4, weight decay 1e-7). The perturbing noise is independent (DG) or, as one reading of
"applying AOT to the discriminator", matched to the images of each batch by the AOT assignment.
The checkpoint kept is the epoch whose guided samples score best (an ``evaluate`` callback), not
the most accurate one.

Sampling (:class:`Guidance`, method-notes g.4): the hook of :func:`aot_model.sampling.heun_sampler`
adds ``-w * sigma * grad log(d / (1 - d))`` to the Euler direction ``(x - D) / sigma`` (and to the
Heun corrector's when ``second_order``) at steps whose sigma is at least ``sigma_threshold``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from aot_model.adm import EncoderUNet, load_encoder, save_encoder
from aot_model.checks import check_choice, check_int
from aot_model.pairing import Pairing
from aot_model.progress import progress_bar
from aot_model.rng import seeded

BETA_MIN, BETA_MAX = 0.1, 20.0  # DG's VP-SDE (method-notes g.3)
TIME_SCALE = 999.0  # ADM's networks take tau * 999
SIGMA_RANGE = (1e-3, 152.0)  # sigma(tau) for tau in [1e-5, 1]: DG's training range
DG_SIGMA_THRESHOLD = 0.0447  # sigma(tau = 0.01), DG's time_min
PROB_CLIP = 1e-5  # DG clips d to [1e-5, 1 - 1e-5] before the log-ratio
LOGIT_CLIP = math.log((1 - PROB_CLIP) / PROB_CLIP)
NOISE_PAIRINGS = ("independent", "aot")


def vp_time(sigma: Tensor) -> Tensor:
    """VP time tau with ``exp(B(tau)) - 1 = sigma^2``, ``B(tau) = tau^2 (b1 - b0) / 2 + tau b0``."""
    spread = BETA_MAX - BETA_MIN
    return (-BETA_MIN + (BETA_MIN**2 + 2 * spread * torch.log1p(sigma**2)).sqrt()) / spread


def vp_sigma(tau: float) -> float:
    """Inverse of :func:`vp_time`: ``sqrt(exp(B(tau)) - 1)``."""
    return math.sqrt(math.expm1(0.5 * tau**2 * (BETA_MAX - BETA_MIN) + tau * BETA_MIN))


def to_float_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 in [-1, 1] (the sampler's and the dataset's scale)."""
    return torch.as_tensor(np.asarray(images)).float() / 127.5 - 1.0


class Discriminator(nn.Module):
    """d(x; sigma) = sigmoid(head(extractor.features(VP input))); the extractor stays frozen.

    The head takes the extractor's middle-block features (its ``in_channels`` and ``image_size``)
    to ``out_channels`` = 1 logit; ``num_classes > 0`` makes it class-conditional.
    """

    def __init__(self, extractor: EncoderUNet, head: EncoderUNet):
        super().__init__()
        keys, size = ("in_channels", "image_size", "out_channels"), extractor.feature_size
        if tuple(head.config[k] for k in keys) != (extractor.feature_channels, size, 1):
            got = ", ".join(f"{k}={head.config[k]}" for k in keys)
            raise ValueError(
                f"the head must take the extractor's {extractor.feature_channels}x{size}x{size} "
                f"features and give 1 logit, got {got}"
            )
        self.extractor = extractor.eval().requires_grad_(False)
        self.head = head

    @staticmethod
    def vp_input(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha * x, tau * 999) for EDM-noised ``x`` ``[B, ...]`` at per-image sigma ``[B]``."""
        alpha = (1 + sigma.double() ** 2).rsqrt().to(x.dtype)
        t = vp_time(sigma.double()).float() * TIME_SCALE
        return x * alpha.reshape(-1, *[1] * (x.ndim - 1)), t

    def forward(self, x: Tensor, sigma: Tensor, class_ids: Tensor | None = None) -> Tensor:
        """Logit of d(x; sigma) ``[B]``: log(d / (1 - d)) before clipping. The frozen extractor
        records no graph unless ``x`` requires grad."""
        x_vp, t = self.vp_input(x, sigma)
        return self.head(self.extractor.features(x_vp, t), t, class_ids)[:, 0]


def log_ratio_grad(
    disc: Discriminator, x: Tensor, sigma: Tensor, class_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(grad_x log(d / (1 - d)), log(d / (1 - d)))`` per image, one forward and one backward pass.

    d is clipped to [1e-5, 1 - 1e-5] as DG does, i.e. the logit is clamped (zero gradient where the
    clip binds). Images are independent (GroupNorm, no batch statistics), so the gradient of the
    batch sum is every image's own gradient.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        ratio = disc(x, sigma, class_ids).clamp(-LOGIT_CLIP, LOGIT_CLIP)
        (grad,) = torch.autograd.grad(ratio.sum(), x)
    return grad, ratio.detach()


class Guidance:
    """The sampler hook: ``-w * sigma * grad log(d / (1 - d))`` where sigma >= the threshold.

    ``heun_sampler(..., correction=g, correct_heun=g.second_order)``. Added to the Euler direction
    ``d = (x - D) / sigma = -sigma * score`` it turns the score into ``score + w * grad log ratio``
    (method-notes g.4). Returns None (no discriminator call) below the threshold; DG compares the
    batch's smallest sigma, which equals every image's sigma without churn.

    ``weight`` w is finite (DG: 2 unconditional, 1 conditional; 0 leaves the sampler unguided);
    ``sigma_threshold`` defaults to DG's 0.0447 (VP time 0.01); ``second_order`` also corrects the
    Heun corrector's direction (DG's dg_weight_2nd_order = w; default off).
    """

    def __init__(
        self,
        discriminator: Discriminator,
        weight: float,
        *,
        sigma_threshold: float = DG_SIGMA_THRESHOLD,
        second_order: bool = False,
    ):
        if not math.isfinite(weight):
            raise ValueError(f"guidance weight must be a finite number, got {weight!r}")
        if not 0.0 <= sigma_threshold < math.inf:
            raise ValueError(f"sigma_threshold must be a finite number >= 0, got {sigma_threshold}")
        self.discriminator = discriminator
        self.weight = float(weight)
        self.sigma_threshold = float(sigma_threshold)
        self.second_order = bool(second_order)
        self.calls = 0  # discriminator forward + backward passes, each over a whole batch

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor | None:
        if self.weight == 0.0 or sigma.min().item() < self.sigma_threshold:
            return None
        self.calls += 1
        class_ids = None if class_labels is None else class_labels.argmax(1)
        grad, _ = log_ratio_grad(self.discriminator, x, sigma, class_ids)
        return -self.weight * sigma.reshape(-1, *[1] * (x.ndim - 1)) * grad


# ------------------------------------------------------------------------------------------------
# training


def log_uniform_sigma(n: int, generator: torch.Generator, lo: float, hi: float) -> Tensor:
    """``n`` noise levels with log sigma uniform on [log lo, log hi]."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).float()


def _perturb(
    y: Tensor, sigma: Tensor, generator: torch.Generator, pairing: str, labels: Tensor | None
) -> Tensor:
    """``y + sigma * n`` with independent n, or n permuted to the batch's AOT assignment."""
    noise = torch.randn(y.shape, generator=generator).to(y.device)
    if pairing == "aot":
        noise = noise[Pairing().match(y, noise, labels).to(y.device)]
    return y + sigma.to(y.device).reshape(-1, 1, 1, 1) * noise


def train_noise_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    config: dict,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    sigma_range: tuple[float, float] = SIGMA_RANGE,
    holdout_fraction: float = 0.1,
    device: torch.device | str = "cpu",
) -> tuple[EncoderUNet, dict]:
    """Train an :class:`EncoderUNet` (``config``; ``out_channels`` = the number of classes) to
    classify noised uint8 ``images`` ``[N, C, H, W]`` by int ``labels`` ``[N]``: the project's own
    DG extractor.

    Each image is perturbed to ``y + sigma * n`` at its own log-uniform sigma and fed in DG's VP
    form (:meth:`Discriminator.vp_input`), so the features are noise-aware over the whole range the
    discriminator sees. Cross-entropy, Adam. Returns the net in eval mode and an info dict with the
    per-epoch ``history`` and the held-out accuracy at random sigma and at sigma <= 1.
    """
    epochs = check_int("epochs", epochs, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    n_out = config["out_channels"]
    if labels.min() < 0 or labels.max() >= n_out:
        raise ValueError(f"labels must lie in [0, out_channels={n_out}), got {labels.min()}..")
    x, y = to_float_images(images).to(device), torch.as_tensor(labels, dtype=torch.int64).to(device)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_held = max(1, round(holdout_fraction * len(x)))
    held, train_idx = order[:n_held], order[n_held:]
    with seeded(seed):
        net = EncoderUNet(**config).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    with progress_bar(total=epochs, desc="noise classifier", unit="epoch") as bar:
        for epoch in range(epochs):
            net.train()
            total, correct, count = 0.0, 0, 0
            perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
            for start in range(0, len(perm), batch_size):
                idx = perm[start : start + batch_size]
                sigma = log_uniform_sigma(len(idx), generator, *sigma_range).to(device)
                x_vp, t = Discriminator.vp_input(
                    _perturb(x[idx], sigma, generator, "independent", None), sigma
                )
                logits = net(x_vp, t)
                loss = nn.functional.cross_entropy(logits, y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                correct += (logits.argmax(1) == y[idx]).sum().item()
                count += len(idx)
            history.append({"epoch": epoch + 1, "loss": total / count, "accuracy": correct / count})
            bar.update()
    net.eval()
    held_sigma = log_uniform_sigma(n_held, torch.Generator().manual_seed(seed + 1), *sigma_range)
    info = {
        "history": history,
        "heldout_accuracy": _classifier_accuracy(net, x[held], y[held], held_sigma, seed),
        "heldout_accuracy_sigma_le_1": _classifier_accuracy(
            net, x[held], y[held], held_sigma.clamp(max=1.0), seed
        ),
        "num_train": len(train_idx),
        "num_heldout": n_held,
    }
    return net, info


@torch.no_grad()
def _classifier_accuracy(net: EncoderUNet, x: Tensor, y: Tensor, sigma: Tensor, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed + 2)
    sigma = sigma.to(x.device)
    x_vp, t = Discriminator.vp_input(_perturb(x, sigma, generator, "independent", None), sigma)
    return (net(x_vp, t).argmax(1) == y).float().mean().item()


def check_fakes(real: np.ndarray, fake: np.ndarray) -> None:
    """Generated samples must be uint8 images of the real data's ``[C, H, W]``."""
    if fake.dtype != np.uint8 or fake.ndim != 4 or fake.shape[1:] != real.shape[1:]:
        raise ValueError(
            f"fake samples must be uint8 [N, {', '.join(map(str, real.shape[1:]))}] like the data, "
            f"got {fake.dtype} {list(fake.shape)}"
        )


def train_discriminator(
    discriminator: Discriminator,
    real: np.ndarray,
    fake: np.ndarray,
    *,
    real_labels: np.ndarray | None = None,
    fake_labels: np.ndarray | None = None,
    epochs: int,
    batch_size: int = 128,
    lr: float = 3e-4,
    weight_decay: float = 1e-7,
    sigma_range: tuple[float, float] = SIGMA_RANGE,
    pairing: str = "independent",
    holdout_fraction: float = 0.1,
    seed: int = 0,
    evaluate: Callable[[int, Discriminator], float] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Discriminator, dict]:
    """Train the head of ``discriminator`` on real (label 1) vs generated (label 0) images.

    ``real`` and ``fake`` are uint8 ``[N, C, H, W]`` of one ``[C, H, W]``; a class-conditional head
    needs their class ids ``real_labels`` and ``fake_labels`` (int ``[N]``). The extractor stays
    frozen. DG: 50 epochs (released checkpoints: 60 and 250), batch 128, lr 3e-4, weight decay
    1e-7, sigma log-uniform on about [1e-3, 152].

    ``pairing`` "independent" draws the perturbing noise independently (DG), "aot" matches it to
    each batch's images by the AOT assignment (`aot_model.pairing.Pairing`, within classes when
    conditional). ``holdout_fraction`` of the images is kept out of training for held-out loss and
    accuracy (at fixed sigma and noise). ``seed`` drives the split, shuffling, sigma and noise;
    initialisation is the caller's. ``evaluate(epoch, discriminator) -> score`` (lower is better,
    e.g. the fd of guided samples) picks the epoch whose head is kept; None keeps the last epoch.

    Returns the discriminator holding the chosen head, in eval mode, and info with per-epoch
    ``history`` (train/held-out loss and accuracy, both class-balanced: with unequal real and fake
    counts each set carries half the weight; score; seconds) and ``chosen_epoch``.
    """
    epochs = check_int("epochs", epochs, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    check_choice("pairing", pairing, NOISE_PAIRINGS)
    check_fakes(real, fake)
    conditional = discriminator.head.config["num_classes"] > 0
    if conditional and (real_labels is None or fake_labels is None):
        raise ValueError("a class-conditional head needs real_labels and fake_labels")
    x = torch.cat([to_float_images(real), to_float_images(fake)]).to(device)
    target = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(device)
    # Class-balanced loss: with unequal counts each set carries half of the total weight.
    balance = torch.cat(
        [torch.full((len(real),), 0.5 / len(real)), torch.full((len(fake),), 0.5 / len(fake))]
    ).to(device) * len(x)
    ids = (
        torch.as_tensor(np.concatenate([real_labels, fake_labels]), dtype=torch.int64).to(device)
        if conditional
        else None
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_held = max(2, round(holdout_fraction * len(x)))
    held, train_idx = order[:n_held], order[n_held:]
    held_sigma = log_uniform_sigma(n_held, torch.Generator().manual_seed(seed + 1), *sigma_range)
    held_set = (  # _heldout's x, sigma, target, ids and weight
        _perturb(x[held], held_sigma, torch.Generator().manual_seed(seed + 2), "independent", None),
        held_sigma.to(device),
        target[held],
        None if ids is None else ids[held],
        balance[held],
    )
    disc = discriminator.to(device)
    optimizer = torch.optim.Adam(disc.head.parameters(), lr=lr, weight_decay=weight_decay)
    history, best_score, chosen, best_head = [], math.inf, None, None
    with progress_bar(total=epochs, desc="discriminator", unit="epoch") as bar:
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            disc.head.train()
            sums = np.zeros(3)  # weighted loss, weighted correct, weight
            perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
            for begin in range(0, len(perm), batch_size):
                idx = perm[begin : begin + batch_size]
                batch_ids = None if ids is None else ids[idx]
                sigma = log_uniform_sigma(len(idx), generator, *sigma_range).to(device)
                # No graph goes through the frozen extractor: the noisy images need no grad.
                logit = disc(
                    _perturb(x[idx], sigma, generator, pairing, batch_ids), sigma, batch_ids
                )
                weight = balance[idx]
                loss = nn.functional.binary_cross_entropy_with_logits(
                    logit, target[idx], weight=weight
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                correct = ((logit > 0) == (target[idx] > 0.5)).float()
                sums += [
                    loss.item() * len(idx),
                    (weight * correct).sum().item(),
                    weight.sum().item(),
                ]
            disc.head.eval()
            row = {"epoch": epoch, "loss": sums[0] / sums[2], "accuracy": sums[1] / sums[2]}
            row.update(_heldout(disc, *held_set))
            if evaluate is not None:
                row["score"] = float(evaluate(epoch, disc))
            row["seconds"] = time.perf_counter() - start
            history.append(row)
            score = row.get("score", -epoch)  # without a score, the last epoch wins
            if not math.isfinite(score):  # a diverged epoch is never chosen over a finite one
                score = math.inf
            if chosen is None or score < best_score:
                best_score, chosen, best_head = score, epoch, copy.deepcopy(disc.head.state_dict())
            bar.set_postfix(acc=f"{row['heldout_accuracy']:.3f}", score=row.get("score"))
            bar.update()
    disc.head.load_state_dict(best_head)
    disc.eval()
    return disc, {
        "history": history,
        "chosen_epoch": chosen,
        "num_real": len(real),
        "num_fake": len(fake),
    }


@torch.no_grad()
def _heldout(
    disc: Discriminator, x: Tensor, sigma: Tensor, target: Tensor, ids, weight: Tensor
) -> dict:
    """Class-balanced held-out loss and accuracy at fixed noise."""
    logit = torch.cat(
        [
            disc(x[i : i + 256], sigma[i : i + 256], None if ids is None else ids[i : i + 256])
            for i in range(0, len(x), 256)
        ]
    )
    loss = nn.functional.binary_cross_entropy_with_logits(logit, target, weight=weight)
    correct = ((logit > 0) == (target > 0.5)).float()
    accuracy = (weight * correct).sum() / weight.sum()
    return {
        "heldout_loss": loss.item() * len(x) / weight.sum().item(),
        "heldout_accuracy": accuracy.item(),
    }


# ------------------------------------------------------------------------------------------------
# files


def save_discriminator(
    path: str | Path, disc: Discriminator, *, extractor_sha256: str, **info
) -> str:
    """Write the head as an encoder file whose ``info`` names the extractor's SHA-256 it needs."""
    return save_encoder(path, disc.head, extractor_sha256=extractor_sha256, **info)


def load_discriminator(
    head_path: str | Path,
    extractor_path: str | Path,
    *,
    extractor_sha256: str | None = None,
    device: torch.device | str = "cpu",
) -> Discriminator:
    """Rebuild a :class:`Discriminator` from an extractor file and a head file (eval mode).

    ``extractor_sha256``: when given, the head must have been trained on exactly that extractor.
    """
    retrain = "retrain the discriminator"
    head, info = load_encoder(head_path, device=device, remedy=retrain)
    if extractor_sha256 is not None and info.get("extractor_sha256") != extractor_sha256:
        raise ValueError(
            f"{head_path} was trained on extractor {info.get('extractor_sha256')}, but "
            f"{extractor_path} has SHA-256 {extractor_sha256}; {retrain}"
        )
    extractor, _ = load_encoder(
        extractor_path, device=device, remedy="rebuild the extractor, then " + retrain
    )
    return Discriminator(extractor, head).eval()
