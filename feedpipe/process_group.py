"""The torchrun process group a rank belongs to, and the few collectives feedpipe needs on top of it.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT) for every worker; a plain
`python` process has none of them and is rank 0 of 1, with no process group at all. The backend
follows the device: NCCL when each rank has a GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankGroup:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        if not self.is_distributed:
            return "none"
        return "nccl" if self.device.type == "cuda" else "gloo"

    # -- collectives (identity when world_size == 1) ---------------------------------------------
    def sum(self, *values: float) -> tuple[float, ...]:
        if not self.is_distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return tuple(t.tolist())

    def min(self, value: int) -> int:
        return self._reduce_int(value, dist.ReduceOp.MIN)

    def max(self, value: int) -> int:
        return self._reduce_int(value, dist.ReduceOp.MAX)

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's 1-D tensor in rank order (lengths may differ by rank)."""
        if not self.is_distributed:
            return t
        n_max = self.max(int(t.numel()))
        lengths = [torch.zeros(1, dtype=torch.long, device=self._comm_device) for _ in range(self.world_size)]
        dist.all_gather(lengths, torch.tensor([t.numel()], device=self._comm_device))
        padded = torch.zeros(n_max, dtype=t.dtype, device=self._comm_device)
        padded[: t.numel()] = t.to(self._comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(n)] for p, n in zip(parts, lengths)]).cpu()

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def _reduce_int(self, value: int, op) -> int:
        if not self.is_distributed:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self._comm_device)
        dist.all_reduce(t, op=op)
        return int(t.item())

    @property
    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo only CPU ones.
        return self.device if self.backend == "nccl" else torch.device("cpu")


def join_process_group(device: str = "auto") -> RankGroup:
    """This process's place under torchrun (rank 0 of 1 without it); starts the process group when
    there is more than one rank. device: 'auto' (a GPU per rank when visible), 'cpu' or 'cuda'."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        visible = torch.cuda.device_count()
        if local_rank >= visible:  # set_device would fail with only "invalid device ordinal"
            raise RuntimeError(
                f"rank {rank} is local rank {local_rank} of {os.environ.get('LOCAL_WORLD_SIZE', '?')} on this machine, "
                f"which shows {visible} CUDA device(s): run one rank per GPU (torchrun --nproc_per_node {visible})"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    group = RankGroup(rank, world, local_rank, dev)
    if group.is_distributed and not dist.is_initialized():
        dist.init_process_group(group.backend)
    return group


def leave_process_group(group: RankGroup) -> None:
    if group.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of the index-th of `parts` contiguous ranges of n items (sizes differ by at most 1)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)
