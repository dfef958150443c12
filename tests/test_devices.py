"""Device choice, GPUs that CUDA cannot use, the process's float32 precision, and the process
group's lifetime; CUDA and nvidia-smi are stand-ins (this machine has neither)."""

import datetime
import stat

import pytest
import torch
import torch.distributed as dist
from builders import RUN

from aot_model import devices, distributed, training
from aot_pipeline.cli import _device


@pytest.fixture
def no_gpu(monkeypatch):
    """CUDA unavailable, no nvidia-smi on the PATH and no GPU hidden on purpose."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA with two GPUs; set_device calls are recorded in the returned list."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def fake_nvidia_smi(monkeypatch, tmp_path, stdout: str, status: int = 0) -> None:
    """An ``nvidia-smi`` first on the PATH that prints ``stdout`` and exits with ``status``."""
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nexit {status}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_requirement_matches_the_installed_wheel():
    """The stated CUDA version and oldest architecture are the ones torch was built for."""
    assert torch.version.cuda == devices.CUDA_VERSION
    oldest = min(int(arch.removeprefix("sm_")) for arch in torch.cuda.get_arch_list())
    assert divmod(oldest, 10) == devices.MIN_COMPUTE_CAPABILITY
    assert (
        f"torch {torch.__version__} needs an NVIDIA driver >= 580.65.06 (CUDA 13.0) and a GPU of "
        "compute capability >= 7.5"
    ) == devices.REQUIREMENT


def test_auto_without_any_gpu_is_the_cpu_and_says_why(no_gpu, capsys):
    assert devices.resolve("auto") == (
        "cpu",
        "no NVIDIA GPU: CUDA is unavailable and nvidia-smi lists none",
    )
    assert _device("auto") == "cpu"
    assert capsys.readouterr().err == (
        "--device auto: cpu (no NVIDIA GPU: CUDA is unavailable and nvidia-smi lists none)\n"
    )


def test_auto_with_cuda_is_cuda_and_names_the_gpu(two_gpus, capsys):
    assert _device("auto") == "cuda"
    assert capsys.readouterr().err == (
        "--device auto: cuda (CUDA sees 2 GPU(s), cuda:0 is NVIDIA H100 80GB HBM3)\n"
    )
    assert _device("cpu") == "cpu" and capsys.readouterr().err == ""  # said only for auto


@pytest.mark.parametrize("asked", ["auto", "cuda", "cuda:0"])
def test_a_gpu_that_cuda_cannot_use_is_an_error_naming_the_driver(
    no_gpu, monkeypatch, tmp_path, asked
):
    fake_nvidia_smi(monkeypatch, tmp_path, "Tesla T4, 535.104.05, 7.5\n")
    with pytest.raises(ValueError) as caught:
        devices.resolve(asked)
    assert str(caught.value) == (
        f"--device {asked!r}: nvidia-smi lists Tesla T4 (driver 535.104.05, compute capability "
        f"7.5) but CUDA cannot use it: {devices.REQUIREMENT}; update the driver, or pass "
        "--device cpu"
    )


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_gpus_hidden_on_purpose_are_the_cpu_not_an_error(no_gpu, monkeypatch, tmp_path, hidden):
    fake_nvidia_smi(monkeypatch, tmp_path, "Tesla T4, 535.104.05, 7.5\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert devices.resolve("auto") == ("cpu", "CUDA_VISIBLE_DEVICES hides every GPU")


def test_nvidia_smi_that_fails_lists_no_gpu(no_gpu, monkeypatch, tmp_path):
    """A driver too broken for nvidia-smi itself is no GPU (nothing to name in an error)."""
    fake_nvidia_smi(monkeypatch, tmp_path, "NVIDIA-SMI has failed", status=9)
    assert devices.resolve("auto")[0] == "cpu"
    with pytest.raises(ValueError) as caught:
        devices.resolve("cuda", "device")
    assert str(caught.value) == "device 'cuda': CUDA is not available (nvidia-smi lists no GPU)"


@pytest.mark.parametrize("asked", ["tpu", "CUDA", "cuda:", "cuda:-1", "cuda:0 ", "cuda:x", 0])
def test_malformed_devices_are_refused(two_gpus, asked):
    with pytest.raises(ValueError) as caught:
        devices.resolve(asked, "--device")
    assert str(caught.value) == (
        f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {asked!r}"
    )


def test_cuda_n_must_be_a_visible_gpu(two_gpus):
    assert devices.resolve("cuda:1") == ("cuda:1", "asked for")
    with pytest.raises(ValueError) as caught:
        devices.resolve("cuda:2")
    assert str(caught.value) == "--device 'cuda:2' must name a visible GPU, cuda:0 to cuda:1"


@pytest.fixture
def restore_precision():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


@pytest.mark.parametrize(("tf32", "matmul"), [(True, "high"), (False, "highest")])
def test_precision_set_once_reads_back_through_every_api(restore_precision, tf32, matmul):
    """Inductor and benchmarks/paper_cost.py read the flags through both APIs: neither raises."""
    devices.set_float32_precision(tf32)
    assert devices.float32_precision() == {"matmul": matmul, "cudnn_tf32": tf32}
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    mode = "tf32" if tf32 else "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == mode


# ------------------------------------------------------------------------------------------------
# The training loop's device, and the process group.


class _Stop(Exception):
    """Raised by a stand-in right after the loop picked its device."""


def test_two_runs_given_cuda_0_and_cuda_1_land_on_two_gpus(toy, tmp_path, two_gpus, monkeypatch):
    """The flow hands side-by-side branches cuda:0 and cuda:1 outside torchrun."""
    picked = []

    real_init = training.distributed.init

    def stop(device):
        picked.append(real_init(device)[2])
        raise _Stop

    monkeypatch.setattr(training.distributed, "init", stop)
    for index, asked in enumerate(("cuda:0", "cuda:1")):
        with pytest.raises(_Stop):
            training.training_loop(tmp_path / str(index), toy, RUN, device=asked, progress=False)
    assert two_gpus == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert picked == two_gpus


def test_torchrun_ranks_take_their_local_gpu_and_a_timeout(two_gpus, monkeypatch):
    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: started.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.init("cuda") == (1, 2, torch.device("cuda", 1))
    assert two_gpus == [torch.device("cuda", 1)]
    assert started == [
        {"backend": "nccl", "device_id": torch.device("cuda", 1), "timeout": distributed.TIMEOUT}
    ]
    # Longer than NCCL's default of 10 minutes: rank 0 alone solves and writes meanwhile.
    assert datetime.timedelta(minutes=10) < distributed.TIMEOUT
    with pytest.raises(ValueError) as caught:
        distributed.init("cuda:0")
    assert str(caught.value) == (
        "device must be 'cuda' under torchrun with 2 processes (each takes cuda:LOCAL_RANK), "
        "got 'cuda:0'"
    )


def test_the_group_init_starts_is_destroyed_at_exit(two_gpus, monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    at_exit = []
    monkeypatch.setattr(distributed.atexit, "register", at_exit.append)
    distributed.init("cuda")  # one process: no group, nothing to destroy
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.init("cuda")
    assert at_exit == [distributed.destroy]


def test_destroy_ends_a_gloo_group_and_is_safe_without_one(tmp_path):
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)
    distributed.destroy()
    assert not dist.is_initialized()
    distributed.destroy()
