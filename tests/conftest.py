"""Shared test settings: small thread pools so the suite behaves on a 2-core CI machine."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("AOT_TEST_THREADS", "2")))


@pytest.fixture
def generator():
    """A seeded CPU generator: every random draw in a test is reproducible."""
    return torch.Generator().manual_seed(0)
