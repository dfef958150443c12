"""Small helpers so one code path serves plain ``python`` and ``torchrun``.

`init` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process
group only when WORLD_SIZE > 1, with NCCL on CUDA and gloo on the CPU. Without torchrun every
helper degrades to the single-process case (rank 0 of 1, collectives are no-ops).
"""

import os

import torch
import torch.distributed as dist
from torch import nn


def init(device_type: str | None = None) -> tuple[int, int, torch.device]:
    """Start the process group if torchrun asked for several processes.

    Parameters
    ----------
    device_type : {None, "cpu", "cuda"}
        None picks CUDA when available. The backend follows: NCCL for CUDA, gloo for the CPU.

    Returns
    -------
    rank, world_size : int
    device : torch.device
        ``cuda:LOCAL_RANK`` when CUDA is used, else ``cpu``.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return rank, world_size, device


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if rank() == 0:
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (NaN on any rank propagates to all) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with the copy held by ``src``, in place."""
    if dist.is_initialized():
        dist.broadcast(tensor, src)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of identical shape held by each rank, in rank order."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks.

    Makes the start state identical everywhere whatever each rank drew at construction, including
    buffers such as NCSN++'s random Fourier frequencies (method-notes a.5: the EDM-AOT fork trains
    with ``broadcast_buffers=False``, so nothing else would synchronise them).
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            broadcast_(tensor.data, src)
