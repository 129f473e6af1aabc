"""Data-parallel training under ``torchrun``: process group set-up and the few collectives a step needs.

The design keeps one process's maths exact: every rank reads its own equal slice of each global batch, losses
are per-rank MEANS, and gradients are AVERAGED across ranks before clipping and the Adam step, so the update
equals the single-process update on the full batch (up to float summation order). Everything here is a no-op
when ``WORLD_SIZE`` is 1 or unset, so library code calls these functions unconditionally.

Backends: gloo on CPU, NCCL on CUDA. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; see ``bench/README.md`` ("Scaling out").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import FisError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the job (rank 0 of 1 outside ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, metrics and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> World:
    """The world ``torchrun`` describes in the environment (single process when the variables are absent)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise FisError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})", field="environment",
                       fix="launch with torchrun, or unset these variables") from None


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current() -> World:
    """The running world (from the process group when one is initialised, else from the environment)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


@contextmanager
def session(device: str = "cpu") -> Iterator[World]:
    """Initialise the process group when launched with ``WORLD_SIZE > 1`` (and tear it down afterwards).

    A group that the caller already initialised is used as is and left running.
    """
    world = env_world()
    if not world.distributed or (dist.is_available() and dist.is_initialized()):
        yield current() if dist.is_available() and dist.is_initialized() else world
        return
    if not dist.is_available():  # pragma: no cover - every supported torch build has it
        raise FisError("this torch build has no torch.distributed", field="WORLD_SIZE", fix="run one process")
    from .models import resolve_device  # cuda / auto -> cuda:LOCAL_RANK, so each rank uses its own GPU

    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.world_size)
    log.info("rank %d of %d joined (%s)", world.rank, world.world_size, "nccl" if cuda else "gloo")
    try:
        yield world
    finally:
        dist.destroy_process_group()


def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values to every rank (the seeded init is identical anyway; this makes it certain)."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce the mean of the gradients in ONE flat buffer (a missing gradient counts as zeros)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (returns ``t`` itself, reduced in place; unchanged in one process)."""
    if active():
        dist.all_reduce(t)
    return t


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """Elementwise OR of a boolean mask over ranks (e.g. which latents fired anywhere in the global batch)."""
    if not active():
        return mask
    m = mask.to(torch.uint8)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.bool()


def mean_stats(stats: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks in one all-reduce (so logged numbers describe the global batch)."""
    if not active() or not stats:
        return stats
    keys = sorted(stats)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if active():
        dist.barrier()



def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); without one, under torchrun (RANK / WORLD_SIZE set) the rank picks the shard.

    Used by `fis harvest --shard` and `fis battery --shard`.
    """
    if shard is None:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not launched by torchrun
            return 0, 1
        world = env_world()
        return world.rank, world.world_size
    try:
        i, n = (int(p) for p in shard.split("/"))
    except ValueError:
        raise FisError(f"bad shard '{shard}'", field="--shard", fix="write it as i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise FisError(f"shard index {i} is not in 0..{n - 1}", field="--shard", fix="write it as i/n with i < n")
    return i, n
