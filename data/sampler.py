"""The order of training samples: one seeded permutation per epoch, cut into optimizer steps.

Each optimizer step consumes ``batch_size * world * accum_steps`` samples, split into
``world * accum_steps`` micro-batches of ``batch_size``; micro-batch ``c = a * world + rank`` goes
to accumulation round ``a`` of process ``rank``. So a run on 2 processes and a run on 1 process
that accumulates 2 micro-batches see exactly the same micro-batches, and a resumed run can skip
the steps it has done. The tail of the permutation that does not fill a step is dropped.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["StepBatchSampler"]


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches (lists of dataset items) for one epoch.

    Args:
        n_items: dataset length. batch_size: samples per micro-batch. world, rank: processes and
        this one's rank. accum_steps: micro-batches per process and optimizer step. seed, epoch:
        the permutation's seed. skip_steps: optimizer steps of this epoch already done.
    """

    def __init__(self, n_items: int, batch_size: int, world: int = 1, rank: int = 0, accum_steps: int = 1,
                 seed: int = 0, epoch: int = 0, skip_steps: int = 0):
        self.n_items, self.batch_size, self.world, self.rank = n_items, batch_size, world, rank
        self.accum_steps, self.seed, self.epoch, self.skip_steps = accum_steps, seed, epoch, skip_steps
        self.per_step = batch_size * world * accum_steps
        if n_items < self.per_step:
            raise ValueError(f"{n_items} training samples cannot fill one optimizer step of "
                             f"{batch_size} x {world} processes x {accum_steps} accumulation steps; "
                             f"lower batch_size or raise repeats")

    @property
    def steps(self) -> int:
        """Optimizer steps in the epoch (including skipped ones)."""
        return self.n_items // self.per_step

    def __len__(self) -> int:
        return (self.steps - self.skip_steps) * self.accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        perm = np.random.default_rng([self.seed, 7919, self.epoch]).permutation(self.n_items)
        b = self.batch_size
        for step in range(self.skip_steps, self.steps):
            chunk = perm[step * self.per_step:(step + 1) * self.per_step]
            for a in range(self.accum_steps):
                c = a * self.world + self.rank
                yield chunk[c * b:(c + 1) * b].tolist()
