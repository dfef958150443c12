"""Every attention layer hands scaled_dot_product_attention a layout that a fused kernel accepts.

Checked on the CPU with SDPA restricted to its flash kernel, which (like CUDA's flash and
memory-efficient kernels) refuses q, k, v whose last dimension is strided; the math kernel, with
its full [L, L] weights, is the reference the fused result must equal.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from aot_model.adm import AttentionBlock, AttentionPool2d
from aot_model.networks import SelfAttention


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (lambda: SelfAttention(32), (2, 32, 4, 4)),
        (lambda: AttentionBlock(64, num_head_channels=16), (2, 64, 3, 3)),
        (lambda: AttentionPool2d(4, 64, num_head_channels=16, out_channels=8), (2, 64, 4, 4)),
    ],
    ids=["SelfAttention", "AttentionBlock", "AttentionPool2d"],
)
def test_a_fused_kernel_accepts_the_layout_and_matches_the_math_kernel(layer, shape):
    torch.manual_seed(0)
    module = layer()
    for p in module.parameters():  # the output projections start at zero
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(shape)
    with sdpa_kernel(SDPBackend.MATH):
        expected = module(x)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = module(x)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
