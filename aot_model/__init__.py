"""EDM diffusion with Approximated Optimal Transport (AOT) noise pairing: the core library.

Pure PyTorch, NumPy and SciPy (clean-fid for FID). Nothing here imports a tracking, orchestration or
configuration library; see docs/architecture.md.
"""
