"""Data-parallel training under ``torchrun``: process group, DistributedDataParallel, data sharding.

:func:`fxprune.recovery.train` calls :func:`context` first. Outside ``torchrun`` (no ``RANK`` /
``WORLD_SIZE`` in the environment, or a world of one process) nothing here does anything. Inside:

- the process group is initialised once (``gloo`` on CPU, ``nccl`` on CUDA) unless the caller already
  did it, and is left initialised (later calls reuse it; :func:`cleanup` destroys it);
- a CUDA device without an index becomes ``cuda:LOCAL_RANK``;
- the module is wrapped in ``DistributedDataParallel`` (hooks still see the plain module);
- a ``DataLoader`` over a map-style dataset is rebuilt with a ``DistributedSampler`` (same batch size
  per process, collate function and workers), so each process sees 1/world of every epoch; any
  other iterable is used as it is (each process must then shard its own data);
- only rank 0 writes files;
- with ``shard=True`` (:func:`fully_sharded`) the module is not wrapped in DDP: a copy of it is sharded with
  PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, per repeated block, then the whole), so each
  process holds 1/world of the weights, gradients and optimiser state, and a block's weights are gathered only
  while it runs: a model that does not fit one device trains on several. The copy is built on the meta device
  (no second copy of the weights), each process keeps its shard of the caller's weights, and
  :func:`gather_into` writes the trained weights back into the caller's module (one tensor at a time).
"""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

__all__ = ["DistContext", "context", "cleanup", "shard_loader", "wrap", "all_mean", "launch_rank", "fully_sharded",
           "gather_into"]


@dataclass(frozen=True)
class DistContext:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Only the main process writes checkpoints and logs."""
        return self.rank == 0


def launch_rank() -> int:
    """This process's rank as ``torchrun`` launched it (0 outside it, or in a world of one), before any
    process group exists: ``fxprune run`` prunes on every rank and trains data-parallel, and only rank 0
    measures, prints and writes."""
    return int(os.environ.get("RANK", "0")) if launch_world() > 1 else 0


def launch_world() -> int:
    """How many processes ``torchrun`` launched (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def context(device: torch.device) -> tuple[DistContext, torch.device]:
    """The distributed context for this process (initialising the process group when launched by
    ``torchrun`` with more than one process) and the device this process trains on."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    elif launch_world() > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and device.index is None:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        return DistContext(), device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    return DistContext(world, rank, local), device


def cleanup() -> None:
    """Destroy the process group (call once at the end of a ``torchrun`` script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The module to call in the training loop: DDP-wrapped when data-parallel."""
    if not ctx.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def fully_sharded(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``module`` sharded with FSDP2 across the process group, on ``device``, holding ``module``'s
    weights (each process its shard) and buffers. The blocks sharded one by one are the members of every
    ``nn.ModuleList`` (decoder layers, residual blocks); the rest with the whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in module.buffers()})
    replica = copy.deepcopy(module, memo)  # the structure, no weights
    for m in replica.modules():
        if isinstance(m, nn.ModuleList):
            for block in m:
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(replica)
    replica.to_empty(device=device)
    set_model_state_dict(replica, module.state_dict(), options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        mine = dict(replica.named_buffers())
        for name, b in module.named_buffers():  # buffers are not sharded; non-persistent ones are not in the state
            mine[name].copy_(b)
    return replica.train(module.training)


def gather_into(replica: nn.Module, module: nn.Module) -> None:
    """The full weights of a :func:`fully_sharded` replica copied into ``module``, on every process (a collective:
    every process calls it), one tensor gathered at a time."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        target = module.state_dict(keep_vars=True)
        for name, t in replica.state_dict().items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            target[name].copy_(full.to(target[name].device))


def shard_loader(loader: Iterable[Any], ctx: DistContext, seed: int = 0) -> Iterable[Any]:
    """A loader whose epoch is this process's share of ``loader``'s epoch (see the module docstring)."""
    if not ctx.enabled:
        return loader
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        warnings.warn("fxprune.recovery: the training loader is not a DataLoader over a map-style dataset with a "
                      "batch size, so it cannot be sharded; every process trains on all of it", stacklevel=3)
        return loader
    if isinstance(loader.sampler, DistributedSampler):
        return loader  # already sharded by the caller
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=shuffle,
                                 seed=seed, drop_last=loader.drop_last)
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, **extra)


def set_epoch(loader: Iterable[Any], epoch: int) -> None:
    """A DistributedSampler shuffles with ``seed + epoch``: tell it the epoch."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def all_mean(value: float, ctx: DistContext, device: torch.device) -> float:
    """The mean of a per-process number over all processes (the logged loss)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world


def sync_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics drift apart between the
    broadcasts DDP does at each forward), so evaluation and the final module agree on all ranks."""
    if not ctx.enabled:
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=0)
