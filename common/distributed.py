"""Distributed helpers that degrade to a single process.

The official evaluation scripts only run under ``torchrun`` (they call ``torch.distributed.barrier()``
unconditionally, hard-code NCCL and ``.cuda()``). Here every helper also works without a process group, so the same
code runs as ``python script.py`` (one process, nothing initialised) and as ``torchrun --nproc_per_node=N
script.py`` (NCCL on CUDA, gloo on the CPU)::

    ctx = init_distributed()                    # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    ...
    total = all_reduce(torch.tensor([n], dtype=torch.float64, device=ctx.device))
    if is_main_process():
        ...
    shutdown_distributed()

Rank, world size and the process group live in ``torch.distributed`` itself; this module keeps no state of its own.
The tensor collectives take tensors on any device (CPU tensors are staged through the current CUDA device under
NCCL). The object collectives pickle their payload (fine for small metadata; never use them for image batches).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "init_distributed",
    "shutdown_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_reduce",
    "all_gather_tensor",
    "all_gather_object",
    "broadcast_object",
    "run_on_main",
    "synchronize",
    "configure_cuda_backends",
    "RankFailedError",
]

T = TypeVar("T")

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``backend`` is None when running as a single process without a process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def _pick_device(requested: torch.device | str | None, local_rank: int) -> torch.device:
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(
    *,
    device: torch.device | str | None = None,
    backend: str | None = None,
    timeout: datetime.timedelta | None = None,
) -> DistributedContext:
    """Initialise the default process group from the ``torchrun`` environment, or run as a single process.

    * ``WORLD_SIZE`` unset (plain ``python``): no process group; rank 0 of 1.
    * ``WORLD_SIZE`` set (``torchrun``, even with one process): ``init_process_group(init_method="env://")`` with
      ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; ``MASTER_ADDR`` / ``MASTER_PORT`` must be set too (torchrun does).
    * A process group that is already initialised is reused as is.

    ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is available (and becomes the current CUDA device), else MPS,
    else the CPU. ``backend`` defaults to ``nccl`` for a CUDA device and ``gloo`` otherwise. ``timeout`` is handed to
    ``init_process_group`` (None keeps torch's default).
    """
    if is_distributed():  # set up by the caller: reuse it
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
        dev = _pick_device(device, local_rank)
        _set_cuda_device(dev)
        return DistributedContext(rank, world_size, local_rank, dev, dist.get_backend())

    world_size = _env_int("WORLD_SIZE")
    if world_size is None:  # plain `python script.py`
        local_rank = _env_int("LOCAL_RANK") or 0
        dev = _pick_device(device, local_rank)
        _set_cuda_device(dev)
        return DistributedContext(0, 1, local_rank, dev, None)

    rank = _env_int("RANK")
    if rank is None:
        raise ValueError("WORLD_SIZE is set but RANK is not: launch with torchrun (it sets both)")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    local_rank = _env_int("LOCAL_RANK")
    local_rank = rank if local_rank is None else local_rank
    dev = _pick_device(device, local_rank)
    _set_cuda_device(dev)
    if not dist.is_available():
        raise RuntimeError("torchrun environment found but this torch build has no torch.distributed support")
    chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(chosen, init_method="env://", world_size=world_size, rank=rank, **kwargs)
    return DistributedContext(rank, world_size, local_rank, dev, chosen)


def _set_cuda_device(dev: torch.device) -> None:
    if dev.type != "cuda":
        return
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {dev} requested but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "use --nproc_per_node <= the number of GPUs"
        )
    torch.cuda.set_device(dev)


def shutdown_distributed() -> None:
    """Destroy the default process group if there is one (a no-op for a single process)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        # Without device_ids NCCL guesses the device from the rank and warns; name the current one instead.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max", "min"] = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks and return it (unchanged for a single process).

    Use float64 for statistics that are summed over many ranks (e.g. feature moments), as EDM's ``fid.py`` does.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; allowed: {sorted(_REDUCE_OPS)}")
    if is_distributed():
        staged = _on_backend_device(tensor)
        dist.all_reduce(staged, op=_REDUCE_OPS[op])
        if staged is not tensor:
            tensor.copy_(staged)
    return tensor


def _on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a copy on the current CUDA device when the backend is NCCL (which moves CUDA tensors
    only), so that CPU statistics can be reduced under either backend."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order: ``(sum_r N_r, *rest)``.

    The first dimension may differ between ranks (e.g. the last shard of a dataset); the other dimensions and the
    dtype must agree. The result is on ``tensor``'s device.
    """
    if not is_distributed():
        return tensor
    source_device, tensor = tensor.device, _on_backend_device(tensor)
    world = dist.get_world_size()
    rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    all_rows = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    counts = [int(r.item()) for r in all_rows]
    # all_gather needs equal shapes: pad every shard to the longest one, then cut the padding off again.
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))  # (max N_r, *rest)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)]).to(source_device)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T | None, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (other ranks may pass None); ``obj`` itself for a single process."""
    if not is_distributed():
        return obj  # type: ignore[return-value]
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


class RankFailedError(RuntimeError):
    """Raised on the other ranks when a :func:`run_on_main` job failed on rank 0."""


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; if it raises, every rank raises.

    This is the "rank 0 goes first" pattern for file-system work (creating folders, scanning or writing a
    manifest): the other ranks wait for the result instead of racing rank 0, and an error on rank 0 becomes an error
    everywhere rather than a hang at the next collective. Rank 0 re-raises its own exception; the others raise
    :class:`RankFailedError` with the same message.
    """
    if not is_distributed():
        return fn()
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as err:
            broadcast_object(("error", f"{type(err).__name__}: {err}"))
            raise
        broadcast_object(("ok", result))
        return result
    status, payload = broadcast_object(None)
    if status == "error":
        raise RankFailedError(f"rank 0 failed: {payload}")
    return payload


def synchronize(device: torch.device | str) -> None:
    """Wait until queued kernels on ``device`` are done (for timing); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif hasattr(torch, "accelerator"):  # other accelerators (XPU, ...) on torch >= 2.6
        torch.accelerator.synchronize(device)


def configure_cuda_backends(device: torch.device) -> None:
    """FlowAR's and xAR's official CUDA settings: TF32 matmuls and convolutions, cuDNN autotuning (no effect on
    other devices; MAR and Harmon keep torch's defaults, as upstream)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
