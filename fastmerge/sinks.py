"""Sinks that keep a merge in memory: a state dict, or an existing module's own parameters.

The engine asks a sink for a destination (`take`), fills it and hands it back (`commit`);
ShardWriter (writer.py) is the sink that streams into safetensors shards. These sinks hand
out each output tensor whole, so the engine writes every value once, straight into the
tensor the caller will use, on whatever device that tensor lives.
"""

from __future__ import annotations

import torch

from .errors import OutputError
from .plan import MergePlan, PlannedTensor


class StateDictSink:
    """A Sink that allocates each output tensor once, on `device`, in `state_dict` by name.

    Merging into the same sink again reuses its tensors in place (a farm's candidate stays
    where it is, with no new allocation); copy a tensor first to keep an earlier result.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.state_dict: dict[str, torch.Tensor] = {}

    def take(self, planned: PlannedTensor, remaining: int) -> torch.Tensor:
        tensor = self.state_dict.get(planned.name)
        if tensor is None or tensor.shape != planned.shape or tensor.dtype != planned.out_dtype:
            tensor = torch.empty(planned.shape, dtype=planned.out_dtype, device=self.device)
            self.state_dict[planned.name] = tensor
        return tensor.view(-1)[planned.numel - remaining :]

    def commit(self, planned: PlannedTensor, filled: torch.Tensor, ready=None) -> None:
        """The values are already where they belong, once `ready` (a CUDA event) is done."""
        if ready is not None:
            ready.synchronize()


class ModuleSink:
    """A Sink that writes a plan's tensors into a module's parameters and buffers, in place.

    Every check runs before any value is written: each planned tensor needs a parameter or
    buffer of its name, shape and dtype (contiguous, on any device), the merge may not write
    two different tensors into storage the module shares between names (tied weights), and
    every parameter of the module must be written.
    """

    def __init__(self, module: torch.nn.Module, plan: MergePlan) -> None:
        named = dict(module.named_parameters(remove_duplicate=False))
        named.update(module.named_buffers(remove_duplicate=False))
        problems: list[str] = []
        missing: list[str] = []
        self.targets: dict[str, torch.Tensor] = {}

        for planned in plan.tensors:
            tensor = named.get(planned.name)
            if tensor is None:
                missing.append(planned.name)
                continue
            problem = _fit_problem(planned, tensor)
            if problem:
                problems.append(problem)
            else:
                self.targets[planned.name] = tensor.detach()

        if missing:
            shown = ", ".join(repr(name) for name in missing[:5])
            problems.append(
                f"{len(missing)} merged tensor(s) have no parameter or buffer of that name in "
                f"the module: {shown}{' ...' if len(missing) > 5 else ''}; the module is not "
                "the merged models' architecture"
            )
        problems += _tie_problems(self.targets, named)

        if problems:
            heading = "the merge cannot be written into this module:"
            raise OutputError("\n".join([heading, *(f"  - {p}" for p in problems)]))

    def take(self, planned: PlannedTensor, remaining: int) -> torch.Tensor:
        return self.targets[planned.name].view(-1)[planned.numel - remaining :]

    def commit(self, planned: PlannedTensor, filled: torch.Tensor, ready=None) -> None:
        """The values were written into the parameter itself, once `ready` is done."""
        if ready is not None:
            ready.synchronize()


def _fit_problem(planned: PlannedTensor, tensor: torch.Tensor) -> str | None:
    where = f"module tensor {planned.name!r}"
    out_dtype = str(planned.out_dtype).removeprefix("torch.")
    if tuple(tensor.shape) != planned.shape:
        return f"{where}: shape {list(tensor.shape)}, but the merge makes {list(planned.shape)}"
    if tensor.dtype != planned.out_dtype:
        return (
            f"{where}: dtype {str(tensor.dtype).removeprefix('torch.')}, but the merge makes "
            f"{out_dtype}; merge with dtype={out_dtype!r} matching the module, or convert the "
            "module first (module.to(torch.<dtype>))"
        )
    if not tensor.is_contiguous():
        return f"{where}: not contiguous; the merge writes whole tensors in place"
    return None


def _tie_problems(targets: dict[str, torch.Tensor], named: dict[str, torch.Tensor]) -> list[str]:
    """Storage the merge would write twice, and module parameters it would not write at all."""

    def address(tensor: torch.Tensor) -> tuple:
        return tensor.device, tensor.data_ptr()

    problems = []
    owners: dict[tuple, str] = {}
    for name, tensor in targets.items():
        if tensor.numel() == 0:
            continue
        first = owners.setdefault(address(tensor), name)
        if first != name:
            problems.append(
                f"the module ties {first!r} and {name!r} (one tensor under two names), but "
                "the merge writes them as two different tensors (one input has its own "
                "lm_head); untie the module's weights (tie_word_embeddings=False) first"
            )

    untouched = [
        name
        for name, tensor in named.items()
        if isinstance(tensor, torch.nn.Parameter)
        and name not in targets
        and tensor.numel() > 0
        and address(tensor) not in owners
    ]
    if untouched:
        shown = ", ".join(repr(name) for name in untouched[:5])
        problems.append(
            f"{len(untouched)} parameter(s) of the module are not produced by the merge: "
            f"{shown}{' ...' if len(untouched) > 5 else ''}; they would keep their old "
            "values (a module with its own lm_head needs a merge that writes one)"
        )
    return problems
