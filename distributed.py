"""torchrun helpers: the process group, who writes, batches shared out over processes, DistributedDataParallel."""
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn


def init(device: str) -> str:
    """This process's device ("auto": cuda if available). Under torchrun (RANK set): one process group, NCCL with
    one GPU per process, or gloo on CPU; ranks other than 0 print nothing (errors still reach stderr)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if "RANK" not in os.environ:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    PEERS[:] = [None] * world()[1]  # (host, pid) of every rank: a survivor names the process that died
    dist.all_gather_object(PEERS, (socket.gethostname(), os.getpid()))
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


PEERS = []


def dead_ranks(wait: float = 2.0) -> list:
    """The ranks on this node whose process has exited (a zombie counts), polled for up to `wait` seconds: a peer's
    sockets close a moment before its process is gone."""
    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] not in "ZX"
        except OSError:
            return False

    deadline = time.time() + wait
    while True:
        dead = [r for r, (host, pid) in enumerate(PEERS) if host == socket.gethostname() and not alive(pid)]
        if dead or time.time() > deadline:
            return dead
        time.sleep(0.1)


def from_main(value):
    """Rank 0's `value` on every process (itself without torchrun): a decision only rank 0 can make, such as taking
    the run directory's lock, taken by all."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def world() -> tuple:
    """(rank, number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """Rank 0 alone writes files and prints; the others compute the same and wait for it where they read them."""
    return world()[0] == 0


def barrier():
    """Under torchrun, wait until every process is here: the others then read what rank 0 has written."""
    if dist.is_initialized():
        dist.barrier()


def shard_map(fn, items: list, batch_size: int, desc: str) -> list:
    """[fn(batch, k) for the k-th batch of items]: under torchrun batch k runs on rank k % world size and the results
    are gathered in order, so fn must depend only on the batch and its position (generate seeds by it)."""
    from progress import Stage  # here: progress imports this module (is_main)

    rank, size = world()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    done = {k: fn(batches[k], k) for k in Stage(range(rank, len(batches), size), desc, unit="batch", leave=False)}
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, done)
        done = {k: v for part in parts for k, v in part.items()}
    return [done[k] for k in range(len(batches))]


class Forward(nn.Module):
    """fn(module, batch) as a module's forward: what DistributedDataParallel needs to see."""

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, batch):
        return self.fn(self.module, batch)


def data_parallel(module: nn.Module, fn, device: str) -> nn.Module:
    """forward(batch) = fn(module, batch): under torchrun a DistributedDataParallel, which averages the gradients over
    the processes in the backward of a step's last micro-batch (the others run under no_sync); the plain module
    otherwise."""
    forward = Forward(module, fn)
    if world()[1] == 1:
        return forward
    return nn.parallel.DistributedDataParallel(forward, device_ids=None if device == "cpu" else [device])


def mean_over_processes(values: torch.Tensor, device: str) -> torch.Tensor:
    """The mean of each process's `values` (itself without torchrun): logged statistics cover the whole step."""
    if world()[1] == 1:
        return values
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu() / world()[1]
