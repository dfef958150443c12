"""Stored-output regression test of the real EDM denoiser, both architectures.

A tiny DDPM++ and a tiny NCSN++ (conditional, augmentation input, self-attention at two places)
get every parameter and buffer set from a seeded generator here, independent of the module's own
initialisation, so the stored outputs pin the wiring (skip scales, attention layout, embeddings,
preconditioning) and not the init. Any change to the forward pass shows as a mismatch; if the
change is intended, regenerate the file and say why in the commit:

    .venv/bin/python tests/test_network_regression.py
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import randomise_parameters

from aot_model.networks import EDMPrecond, preconditioning

STORED = Path(__file__).parent / "data" / "network_outputs.npz"
ARCHS = ("ddpmpp", "ncsnpp")
RES, LABEL_DIM, AUGMENT_DIM = 8, 10, 9
# Attention at 4x4 in the encoder and decoder, plus the decoder's always-on middle attention.
CONFIG = dict(model_channels=8, num_blocks=1, attn_resolutions=[4], dropout=0.0)
# Two levels, and three: with two, an off-by-one index into the per-level down/up/aux modules
# can land on the only module there is and go unseen.
DEPTHS = {"": [1, 2], "_3level": [1, 2, 2]}
SIGMAS = (0.02, 0.7, 25.0)


def fixture_net(arch: str, channel_mult) -> EDMPrecond:
    net = EDMPrecond(
        RES,
        3,
        label_dim=LABEL_DIM,
        arch=arch,
        augment_dim=AUGMENT_DIM,
        channel_mult=channel_mult,
        **CONFIG,
    )
    return randomise_parameters(net, seed=1234).eval()


def fixture_inputs():
    """Two noisy images, per-image sigmas, one-hot labels and augmentation labels."""
    generator = torch.Generator().manual_seed(99)
    x = torch.randn(len(SIGMAS), 3, RES, RES, generator=generator)
    sigma = torch.tensor(SIGMAS)
    labels = F.one_hot(torch.tensor([3, 7, 0]), LABEL_DIM).float()
    augment = torch.randn(len(SIGMAS), AUGMENT_DIM, generator=generator)
    return x * (1 + sigma.reshape(-1, 1, 1, 1)), sigma, labels, augment


def outputs(arch: str) -> dict[str, np.ndarray]:
    x, sigma, labels, augment = fixture_inputs()
    arrays = {}
    for depth, channel_mult in DEPTHS.items():
        net = fixture_net(arch, channel_mult)
        with torch.no_grad():
            arrays[f"{arch}{depth}_denoised"] = net(x, sigma, labels, augment).numpy()
            arrays[f"{arch}{depth}_no_augment"] = net(x, sigma, labels).numpy()
    return arrays


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_match_stored(arch):
    stored = np.load(STORED)
    for key, value in outputs(arch).items():
        # Float32 on any CPU: sums in another order differ by ~1e-6 of the output scale.
        np.testing.assert_allclose(value, stored[key], rtol=1e-4, atol=1e-4, err_msg=key)


def test_stored_outputs_are_informative():
    """The stored outputs are far from c_skip * x, so F_theta really contributes to them."""
    stored = np.load(STORED)
    x, sigma, _, _ = fixture_inputs()
    c_skip, c_out, _, _ = preconditioning(sigma)
    for model in (arch + depth for arch in ARCHS for depth in DEPTHS):
        f_x = (
            stored[f"{model}_denoised"] - (c_skip.reshape(-1, 1, 1, 1) * x).numpy()
        ) / c_out.reshape(-1, 1, 1, 1).numpy()
        assert f_x.std() > 0.1
        assert not np.allclose(
            stored[f"{model}_denoised"], stored[f"{model}_no_augment"], atol=1e-3
        )


if __name__ == "__main__":
    arrays = {k: v for arch in ARCHS for k, v in outputs(arch).items()}
    np.savez_compressed(STORED, **arrays)
    print(f"wrote {STORED} ({STORED.stat().st_size} bytes)")
