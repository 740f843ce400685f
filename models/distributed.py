"""Data-parallel training across processes, GPUs and nodes, launched by torchrun.

`torchrun` starts one process per device and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; `setup` reads them, picks the backend (nccl on CUDA, gloo on CPU) and the device
(cuda:LOCAL_RANK on GPUs), and joins the process group. Without those variables it returns a
single-process context and every helper here is a no-op, so the training loop has one code path.

    torchrun --nproc-per-node 2 -m models.train --arch lstm --preset default --out ckpt
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 \
        --nproc-per-node 8 -m models.train ...

The model is wrapped in DistributedDataParallel (gradients averaged every step), each rank draws
its own batches (seeded by rank), validation is sharded and summed, and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(RuntimeError):
    """A distributed run that cannot start or whose replicas disagree."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job."""

    rank: int = 0  # global rank, 0..world_size-1
    local_rank: int = 0  # rank on this node; picks the GPU
    world_size: int = 1  # processes in the job
    backend: str | None = None  # "gloo" or "nccl"; None for a single process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints progress and writes the checkpoint."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_type: str) -> DistributedContext:
    """Join the torchrun job described by the environment, or run alone.

    device_type: "cpu" or "cuda" (already resolved); cuda needs one visible GPU per local rank.
    """
    if not launched_by_torchrun():
        return DistributedContext()
    missing = [
        name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE is set but {', '.join(missing)} are not; launch with torchrun "
            "(e.g. `torchrun --nproc-per-node 2 -m models.train ...`)"
        )
    context = DistributedContext(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        backend="nccl" if device_type == "cuda" else "gloo",
    )
    if device_type == "cuda":
        if context.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {context.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                "use --nproc-per-node <= the number of GPUs"
            )
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group(backend=context.backend, rank=context.rank, world_size=context.world_size)
    return context


def teardown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """The module to train: DDP around `model` when distributed (it broadcasts rank 0's weights)."""
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sum_across(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (e.g. validation loss sums and token counts)."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def max_across(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """Element-wise maximum of `values` over all ranks: the elapsed time and the stop request, so
    every rank sees the same learning rate and stops at the same step."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas_equal(model: nn.Module, context: DistributedContext, device: torch.device) -> str:
    """The weights digest, after checking that every rank holds the same weights.

    Raises DistributedError listing each rank's digest when they differ.
    """
    digest = weights_digest(model)
    if not context.enabled:
        return digest
    # A digest prefix as an int64 is enough to tell replicas apart, and gloo/nccl can gather it.
    local = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(context.world_size)]
    dist.all_gather(gathered, local)
    prefixes = [f"{int(t.item()):015x}" for t in gathered]
    if len(set(prefixes)) != 1:
        listing = ", ".join(f"rank {r}: {p}" for r, p in enumerate(prefixes))
        raise DistributedError(f"replicas diverged: weight digests differ ({listing})")
    return digest
