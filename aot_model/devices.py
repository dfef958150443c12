"""Which device a run computes on, and the float32 precision a process computes under.

`resolve` turns a device option ("auto", "cpu", "cuda", "cuda:N") into a device and a one-line
reason; a GPU that ``nvidia-smi`` lists but CUDA cannot use is an error, never a CPU fallback.
`set_float32_precision` is the one place that sets TF32 for a process, through the API whose
flags every reader (inductor, ``torch.backends.cudnn.allow_tf32``) can read back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import torch

DEVICE_FORMS = "'cpu', 'cuda' or 'cuda:N'"
# The pinned wheel (torch 2.14.1+cu130): CUDA 13.0's minimum Linux driver, and the oldest
# architecture in torch.cuda.get_arch_list() (sm_75 ... sm_120); tests/test_devices.py checks both.
CUDA_VERSION = "13.0"
MIN_DRIVER = "580.65.06"
MIN_COMPUTE_CAPABILITY = (7, 5)
REQUIREMENT = (
    f"torch {torch.__version__} needs an NVIDIA driver >= {MIN_DRIVER} (CUDA {CUDA_VERSION}) "
    f"and a GPU of compute capability >= {'.'.join(map(str, MIN_COMPUTE_CAPABILITY))}"
)
_FORM = re.compile(r"cpu|cuda(:\d+)?")


def check(device: str, name: str) -> str:
    """``device`` if it is usable here, else a ValueError naming ``name``.

    ``cuda`` and ``cuda:N`` need CUDA; ``N`` must be a visible GPU. When CUDA is unusable but
    ``nvidia-smi`` lists a GPU, the error states the driver requirement.
    """
    if not isinstance(device, str) or not _FORM.fullmatch(device):
        raise ValueError(f"{name} must be {DEVICE_FORMS}, got {device!r}")
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(_unusable(name, device))
    index, count = torch.device(device).index, torch.cuda.device_count()
    if index is not None and index >= count:
        raise ValueError(f"{name} {device!r} must name a visible GPU, cuda:0 to cuda:{count - 1}")
    return device


def resolve(device: str, name: str = "--device") -> tuple[str, str]:
    """(device, why) for a device option; ``auto`` is CUDA when usable, else the CPU."""
    if device != "auto":
        if not isinstance(device, str) or not _FORM.fullmatch(device):
            raise ValueError(f"{name} must be 'auto', {DEVICE_FORMS}, got {device!r}")
        return check(device, name), "asked for"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return "cuda", f"CUDA sees {count} GPU(s), cuda:0 is {torch.cuda.get_device_name(0)}"
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):  # GPUs hidden on purpose
        return "cpu", "CUDA_VISIBLE_DEVICES hides every GPU"
    listed = _nvidia_smi_gpus()
    if listed:
        raise ValueError(_unusable(name, device, listed))
    return "cpu", "no NVIDIA GPU: CUDA is unavailable and nvidia-smi lists none"


def _unusable(name: str, device: str, listed: str | None = None) -> str:
    listed = _nvidia_smi_gpus() if listed is None else listed
    if not listed:
        return f"{name} {device!r}: CUDA is not available (nvidia-smi lists no GPU)"
    return (
        f"{name} {device!r}: nvidia-smi lists {listed} but CUDA cannot use it: {REQUIREMENT}; "
        "update the driver, or pass --device cpu"
    )


def _nvidia_smi_gpus() -> str:
    """'<name> (driver <version>, compute capability <x.y>)' per GPU, '; '-joined; '' if none."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return ""
    query = "--query-gpu=name,driver_version,compute_cap"
    try:
        done = subprocess.run(
            [executable, query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    rows = [line.split(", ") for line in done.stdout.splitlines() if line.count(", ") == 2]
    if done.returncode != 0 or not rows:
        return ""
    return "; ".join(f"{n} (driver {d}, compute capability {c})" for n, d, c in rows)


def set_float32_precision(tf32: bool) -> None:
    """Allow TF32 in float32 matmuls and cuDNN convolutions, or forbid it (EDM: forbidden).

    Process-wide. Set through ``set_float32_matmul_precision`` and ``cudnn.allow_tf32`` only:
    mixing these with the per-backend ``fp32_precision`` switches makes the readers that
    inductor and `float32_precision` use raise.
    """
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def float32_precision() -> dict:
    """The float32 precision this process computes under, for a result's provenance."""
    return {
        "matmul": torch.get_float32_matmul_precision(),
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }
