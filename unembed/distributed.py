"""Running one command as several processes (torch.distributed through accelerate).

`accelerate launch --multi_gpu --num_processes N -m unembed.cli ...` (torchrun underneath) starts N
copies of the same command. Trainers get DDP from the training loop; `caption` and `embed` give each
process a contiguous block of the inputs, write a part file per process, and the main process
merges the parts in input order. One process (no launcher) never imports accelerate here.

CPU processes use the gloo backend: accelerate picks it when told the device is the CPU, which
`use_cpu` decides the same way for the loop and for captioning.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: str = "auto"
    _state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def total(self, count: int) -> int:
        """The sum of `count` over all processes."""
        if self._state is None:
            return count
        from accelerate.utils import gather_object

        return sum(gather_object([count]))

    def block(self, items: Sequence) -> Sequence:
        """This process's contiguous block of `items` (blocks in rank order rebuild the input order)."""
        per, extra = divmod(len(items), self.size)
        start = self.rank * per + min(self.rank, extra)
        return items[start:start + per + (self.rank < extra)]

    def part_path(self, out: str, rank: int | None = None) -> str:
        return f"{out}.part{self.rank if rank is None else rank}-of-{self.size}"

    def merge_parts(self, out: str, merge: Callable[[list[str]], None]) -> None:
        """Once every process has written its part of `out`, the main process merges the parts
        (in rank order, which is input order) and removes them; the others wait for it."""
        self.barrier()
        if self.is_main:
            parts = [p for p in (self.part_path(out, r) for r in range(self.size)) if os.path.exists(p)]
            merge(parts)
            for p in parts:
                os.remove(p)
        self.barrier()


def world(device: str = "auto") -> World:
    """This process's place among the launched ones (a world of one without a launcher)."""
    if launched_world_size() <= 1:
        return World(device=device)
    import atexit

    from accelerate import PartialState

    state = PartialState(cpu=use_cpu(device))
    atexit.register(_close_process_group)
    return World(state.process_index, state.num_processes, str(state.device), state)


def _close_process_group() -> None:
    """Destroy the process group before the interpreter tears down: left to the end, gloo's threads
    can be destroyed while joinable, and the process aborts after its work is done ("terminate
    called without an active exception", seen once in CI on a two-process caption)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
