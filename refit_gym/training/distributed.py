"""Data-parallel training on ``torch.distributed``: process group, user shards, gathered evaluation.

Launch any training command with ``torchrun`` (one process per CPU socket or GPU)::

    torchrun --standalone --nproc_per_node=2 -m refit_gym.cli finetune --config ... --output DIR
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m refit_gym.cli finetune ...        # on each node (its rank)

:func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)
and joins the process group: ``gloo`` on the CPU, ``nccl`` on CUDA (the same code). Without
those variables it returns a one-process :class:`Distributed` and nothing changes. Gradients are
averaged by :class:`torch.nn.parallel.DistributedDataParallel`; every rank works on a
contiguous shard of each batch of users and of the users at evaluation (the metrics are
combined exactly); checkpoints, logs and run records are written by rank 0 only, into a folder
every rank can read (resume reads it on every rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from refit_gym.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the process group (``world = 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    backend: Optional[str] = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and run records."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (sizes differ by at most one)."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def even_shard(self, n: int, what: str) -> range:
        """:meth:`shard` of ``n`` items that must divide evenly (so that averaging the ranks'
        mean losses is the mean over the whole batch)."""
        if n % self.world:
            raise ConfigError(f"{what} ({n}) must be divisible by the number of processes ({self.world})")
        return self.shard(n)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank gets the answer: a rank that must stop
        tells the others before they block in a collective)."""
        if not self.active:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each scalar (the same keys on every rank)."""
        if not self.active:
            return values
        gathered = self.all_gather_objects(values)
        return {key: sum(g[key] for g in gathered) / self.world for key in values}

    def evaluate(self, recommender: Any, data: Any, **kwargs: Any) -> dict[str, dict[str, float]]:
        """:func:`~refit_gym.evaluation.evaluator.evaluate` on this rank's shard of the users,
        combined over ranks (the same metrics as one process, on every rank)."""
        from refit_gym.evaluation.evaluator import combine_shards, evaluate

        if not self.active:
            return evaluate(recommender, data, **kwargs).metrics
        shard = evaluate(recommender, data, users=self.shard(data.n_users), **kwargs)
        return combine_shards(self.all_gather_objects(shard))

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under ``DistributedDataParallel`` (gradients averaged over ranks), or itself."""
        if not self.active:
            return module
        device = next(module.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        # buffers are statistics rebuilt identically from the data on every rank: nothing to broadcast
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True,
                                                         broadcast_buffers=False)


def init_distributed(device: torch.device) -> Distributed:
    """Join torchrun's process group (gloo on the CPU, nccl on CUDA), or a one-process :class:`Distributed`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        torch.distributed.init_process_group(backend=backend)
    return Distributed(rank=rank, world=world, backend=backend)


def local_device(device: torch.device) -> torch.device:
    """A rank's own CUDA device (``LOCAL_RANK``) when training on CUDA under torchrun."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


__all__ = ["Distributed", "init_distributed", "local_device"]
