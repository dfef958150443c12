"""Small helpers so one code path serves plain ``python`` and ``torchrun``.

`init` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process
group only when WORLD_SIZE > 1, with NCCL on CUDA and gloo on the CPU, and destroys it when the
process exits. Without torchrun every helper degrades to the single-process case (rank 0 of 1,
collectives are no-ops).
"""

import atexit
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

# How long a collective waits for the slowest rank. Between two collectives rank 0 alone may
# solve a global W*P matching, write a checkpoint and hand metrics to its callback; NCCL's
# default of 10 minutes would kill a run whose checkpoint write to a slow disk takes longer.
TIMEOUT = datetime.timedelta(minutes=30)


def init(device: str) -> tuple[int, int, torch.device]:
    """Pick this process's device and start the process group if torchrun asked for several.

    Parameters
    ----------
    device : {"cpu", "cuda", "cuda:N"}
        ``cuda`` is ``cuda:LOCAL_RANK`` (one GPU per torchrun process); ``cuda:N`` is GPU N,
        honoured only with one process (several ranks on one GPU would contend for it). The
        backend follows: NCCL for CUDA, gloo for the CPU.

    Returns
    -------
    rank, world_size : int
    device : torch.device
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
    elif chosen.type == "cuda" and world_size > 1:
        raise ValueError(
            f"device must be 'cuda' under torchrun with {world_size} processes (each takes "
            f"cuda:LOCAL_RANK), got {device!r}"
        )
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if chosen.type == "cuda" else "gloo",
            device_id=chosen if chosen.type == "cuda" else None,
            timeout=TIMEOUT,
        )
        # At exit, not when the caller returns: a process may train twice (tests/ddp_worker.py),
        # and a second init after a destroy hangs in torchrun's rendezvous. NCCL warns of
        # communicators left undestroyed at exit.
        atexit.register(destroy)
    return rank, world_size, chosen


def destroy() -> None:
    """Destroy the process group, if there is one (`init` calls this at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


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
