"""A resident pair: both inputs kept in memory, so that a merge farm's next t reads nothing.

An evolutionary merge search or a t sweep merges the same two models hundreds of times.
`ResidentPair` copies both once into memory on its device, within an explicit byte budget,
and computes every tensor pair's statistics (‖a‖², ‖b‖², a·b, which do not depend on t) in
the same pass. After that, each merge is one blend pass over memory: no file is read and no
statistic recomputed. It is a `Pair` whose checkpoints answer from memory, so every target a
Pair merges into (directories, modules in place, state dicts, iterators, sweeps) works the same.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import torch

from .engine import NonFiniteInput
from .errors import FastmergeError
from .merge import Pair, non_finite_error
from .plan import MergePlan, Method
from .reader import Checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ResidentCheckpoint(Checkpoint):
    """A checkpoint whose tensors have been copied into memory: views come from there."""

    resident: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> ResidentCheckpoint:
        """An empty resident copy of an open checkpoint; `copy_in` fills it."""
        return cls(
            checkpoint.source, checkpoint.directory, [], dict(checkpoint.tensors), checkpoint.config
        )

    def copy_in(self, checkpoint: Checkpoint, name: str, device: torch.device) -> torch.Tensor:
        """Copy a tensor of `checkpoint` onto `device` (once) and drop its pages."""
        if name not in self.resident:
            view = checkpoint.view(name)
            self.resident[name] = torch.empty_like(view, device=device).copy_(view)
            checkpoint.release(name)
        return self.resident[name]

    def view(self, name: str) -> torch.Tensor:
        return self.resident[name]

    def release(self, name: str) -> None:
        """Nothing to release: the tensor stays resident."""

    def close(self) -> None:
        self.resident.clear()


class ResidentPair(Pair):
    """Both inputs copied into memory on `device`, with their statistics: a new t costs one
    blend pass and no reads.

    `memory_budget` is the most bytes the two resident copies may take; a pair that needs
    more is refused before anything is copied. The files are closed once the copies are
    made. Loading takes one pass over both inputs (`load_seconds`).
    """

    def __init__(
        self,
        a: str | os.PathLike[str],
        b: str | os.PathLike[str],
        *,
        memory_budget: int,
        device: str = "cpu",
        **options,
    ) -> None:
        super().__init__(a, b, device=device, **options)
        started = time.perf_counter()
        try:
            self.resident_bytes = self._check_budget(memory_budget)
            self.plan = self._load(self.plan)
        finally:
            self._files.close()
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "%d bytes resident on %s in %.2f s",
            self.resident_bytes,
            self.engine.device,
            self.load_seconds,
        )

    def _check_budget(self, memory_budget: int) -> int:
        plan = self.plan
        needed = sum(plan.a.info(name).nbytes for name in _sources(plan, "a")) + sum(
            plan.b.info(name).nbytes for name in _sources(plan, "b")
        )
        if needed > memory_budget:
            raise FastmergeError(
                f"keeping both models resident on {self.engine.device} needs {needed:,} bytes, "
                f"more than memory_budget={memory_budget:,}; raise the budget, or merge from "
                "disk with fastmerge.Pair (which reads each tensor as it merges it)"
            )
        return needed

    def _load(self, plan: MergePlan) -> MergePlan:
        """Copy the inputs onto the device, computing each pair's statistics while it is hot."""
        device = self.engine.device
        a, b = ResidentCheckpoint.of(plan.a), ResidentCheckpoint.of(plan.b)
        for planned in plan.tensors:
            view_a = a.copy_in(plan.a, planned.source_a, device)
            view_b = b.copy_in(plan.b, planned.source_b, device)
            if planned.method is Method.COPY:
                continue
            try:
                self.statistics[planned.name] = self.engine.pair_statistics(planned, view_a, view_b)
            except NonFiniteInput as exc:
                raise non_finite_error(plan, exc) from None
        return replace(plan, a=a, b=b)

    def _bytes_read(self) -> int:
        return 0

    def close(self) -> None:
        for checkpoint in (self.plan.a, self.plan.b):
            checkpoint.close()
        super().close()


def _sources(plan: MergePlan, side: str) -> list[str]:
    """The names a plan reads from one side, each once (a tied head shares the embedding)."""
    names = (p.source_a if side == "a" else p.source_b for p in plan.tensors)
    return list(dict.fromkeys(names))
