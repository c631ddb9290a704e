"""Data-parallel training across processes (torchrun), for users who outgrow one machine.

Under ``torchrun --nproc_per_node=N`` (or multi-node torchrun) every process runs the same
command; ``setup()`` joins the process group (gloo on CPUs, NCCL on GPUs, one GPU per local
rank). Every process builds the same global batch from the same seeded order, takes its own
contiguous share of it, and after the backward pass the gradients are averaged over the
processes, weighted by their shares: a step equals the single-process step on the global batch,
as with DistributedDataParallel. (The gradients are averaged explicitly rather than by DDP's
hooks because certified objectives reach the parameters through the bound engine, not only
through the model's forward.) Buffers (batch-norm statistics, masks) are broadcast from rank 0
after every epoch, and only rank 0 writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup() -> torch.device | None:
    """Join the process group when launched by torchrun; returns this process's device (None
    when not distributed)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def share(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's contiguous share of a global batch (shares differ by at most one)."""
    if not active():
        return x, y
    world, r = dist.get_world_size(), dist.get_rank()
    bounds = [len(y) * i // world for i in range(world + 1)]
    return x[bounds[r]:bounds[r + 1]], y[bounds[r]:bounds[r + 1]]


def average_gradients(model: torch.nn.Module, local: int, total: int) -> None:
    """Every parameter's gradient averaged over the processes, weighted by local / total (the
    share of the global batch each process's mean loss covered)."""
    if not active():
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(local / total)
            dist.all_reduce(p.grad)


def sum_(t: torch.Tensor) -> torch.Tensor:
    """t summed over the processes (in place)."""
    if active():
        dist.all_reduce(t)
    return t


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Every buffer (batch-norm statistics, masks) made rank 0's."""
    if active():
        for b in model.buffers():
            dist.broadcast(b, 0)
