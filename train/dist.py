"""Distributed setup in one place: `init` / `cleanup`, `on_rank0`, and the few collectives the trainer needs.

`init` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without
any of them the process is a single process, world size 1, with no process group. With them, NCCL on GPUs
(each rank on cuda:LOCAL_RANK) or gloo on CPU; if that init fails, or the environment is only partly there,
it raises: a job meant to be distributed never trains alone by accident.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

from common.device import resolve_device

T = TypeVar("T")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistError(RuntimeError):
    """Distributed setup failed or the ranks disagree; the message says which rank and what."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # nccl | gloo | none (single process)
    local_world_size: int = 1  # ranks on this host (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend != "none"

    def placement(self) -> dict:
        """Where this rank sits, as the loaders take it: `VideoLoader(cfg, **env.placement(), ...)`."""
        return dict(rank=self.rank, world_size=self.world_size, local_rank=self.local_rank,
                    local_world_size=self.local_world_size)


def init(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the torchrun job if there is one; world size 1 without torchrun variables."""
    present = [k for k in TORCHRUN_VARS if k in os.environ]
    if not present:
        return DistEnv(0, 0, 1, resolve_device(device), "none")
    if len(present) != len(TORCHRUN_VARS):
        missing = [k for k in TORCHRUN_VARS if k not in os.environ]
        raise DistError(f"partial torchrun environment: {present} set but {missing} missing; launch with "
                        "torchrun, or unset them all for a single process")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = resolve_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    where = (f"rank {rank}/{world} (local {local}), backend {backend}, "
             f"MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={os.environ['MASTER_PORT']}")
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout, device_id=dev if dev.type == "cuda" else None)
    except Exception as e:
        raise DistError(f"distributed init failed for {where}: {e}") from e
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise DistError(f"process group is rank {dist.get_rank()}/{dist.get_world_size()}, expected {where}")
    return DistEnv(rank, local, world, dev, backend, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta):
    """Under torchrun: the env:// store, in a key space of its own for this restart attempt (None otherwise).

    torchrun's c10d rendezvous shares its TCPStore with the workers and keeps it across `--max-restarts`, so a
    restarted process group would read the dead attempt's addresses from it and fail to connect
    (pytorch/pytorch#135712, #167288). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment also
    avoids it; the prefix makes it work either way.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return dist.PrefixStore(f"tubelet/attempt_{attempt}", store)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (sum | max | min); the identity for a single process."""
    if _group_ready():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank."""
    return bool(all_reduce(torch.tensor([float(flag)], device=device), "max").item() > 0)


def mean_scalar(value: float, device: torch.device) -> float:
    t = all_reduce(torch.tensor([float(value)], dtype=torch.float64, device=device))
    return float(t.item()) / (dist.get_world_size() if _group_ready() else 1)


def on_rank0(fn: Callable[[], T]) -> Optional[T]:
    """Run `fn` on rank 0 only. If it raises there, it raises on every rank (rank 0: the error itself; the others:
    a DistError quoting it), so no rank waits in a collective for a rank that gave up. Returns `fn`'s result on
    rank 0, None on the others."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have been told
            error = e
    message = [f"{type(error).__name__}: {error}" if error is not None else ""]
    if _group_ready():
        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0]:
        raise DistError(f"rank 0 failed, so this rank stops too: {message[0]}")
    return result


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's value on every rank."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if _group_ready():
        dist.broadcast(t, src=0)
    return int(t.item())


def barrier() -> None:
    if _group_ready():
        dist.barrier()


@torch.no_grad()
def assert_same_across_ranks(named: Iterable[Tuple[str, torch.Tensor]]) -> int:
    """Raise DistError naming the first tensor that is not bitwise identical on every rank.

    Exact and cheap in memory: the element-wise max and min over ranks are equal only where all ranks agree
    (a NaN anywhere also fails). Returns the number of tensors compared.
    """
    n = 0
    for name, t in named:
        n += 1
        if not _group_ready():
            continue
        lo, hi = t.detach().clone(), t.detach().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            diff = (hi.double() - lo.double()).abs().max().item()
            raise DistError(f"{name} differs across ranks (max difference {diff:.3g}): the ranks have diverged")
    return n
