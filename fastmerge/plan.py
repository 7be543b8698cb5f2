"""Plan a merge from the two checkpoints' headers, before any byte is read or written.

The plan pairs tensors by name, gives each its t, its method and its output shard, decides
how tied embeddings come out, and collects every problem it finds so that the user sees them
all at once instead of one per attempt.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import torch

from .errors import PlanError
from .reader import Checkpoint
from .safetensors_format import MERGEABLE_DTYPES
from .schedule import Schedule, UnmatchedTensor, bind_t

DEFAULT_SHARD_SIZE = 5_000_000_000
"""transformers' default max_shard_size ("5GB"), in bytes."""

OUTPUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# (lm_head, input embedding) names of the architectures whose tying fastmerge understands.
TIED_HEADS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
)

CONFIG_IDENTITY_KEYS = ("model_type", "architectures")


class Method(str, Enum):
    SLERP = "slerp"
    LERP = "lerp"  # always linear: 1-D tensors under --lerp-vectors
    COPY = "copy"  # non-float tensors, identical in both models


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where its inputs come from and how it is made."""

    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    method: Method
    t: float
    source_a: str
    source_b: str
    shard: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass
class MergePlan:
    """Everything the engine and the writer need, decided from headers alone."""

    a: Checkpoint
    b: Checkpoint
    tensors: list[PlannedTensor]
    shard_names: list[str]
    out_dtype: torch.dtype
    t: float | Schedule | Callable[[str], float]
    config: dict | None
    extrapolate: bool = False

    @property
    def output_bytes(self) -> int:
        return sum(p.out_nbytes for p in self.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(
            self.a.info(p.source_a).nbytes + self.b.info(p.source_b).nbytes for p in self.tensors
        )

    def shard_tensors(self, shard: int) -> list[PlannedTensor]:
        return [p for p in self.tensors if p.shard == shard]

    def with_t(self, t: float | str | list | Schedule | Callable[[str], float]) -> MergePlan:
        """The same plan with every tensor's t taken from `t`; raises PlanError like build_plan.

        Only t changes: the pairing, methods and shards stay, so a farm plans once and merges
        at as many t values as it likes.
        """
        t = bind_t(t, self.a)
        values, problems = _t_values([p.name for p in self.tensors], t, self.extrapolate)
        if problems:
            raise PlanError(problems)
        tensors = [replace(planned, t=values[planned.name]) for planned in self.tensors]
        return replace(self, tensors=tensors, t=t)


def build_plan(
    a: Checkpoint,
    b: Checkpoint,
    t: float | Callable[[str], float],
    *,
    out_dtype: torch.dtype = torch.float16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    lerp_vectors: bool = False,
    extrapolate: bool = False,
    allow_architecture_mismatch: bool = False,
) -> MergePlan:
    """Pair the tensors of `a` (the base) and `b` and plan the output, or raise PlanError.

    `t` is a number, a Schedule (or mergekit's list form of one) or a callable name -> t.
    """
    problems: list[str] = []
    t = bind_t(t, a)

    if out_dtype not in OUTPUT_DTYPES.values():
        problems.append(
            f"output dtype {out_dtype} is not supported; choose one of {', '.join(OUTPUT_DTYPES)}"
        )
    if shard_size <= 0:
        problems.append(f"--shard-size must be a positive number of bytes, got {shard_size}")
    if not allow_architecture_mismatch:
        problems += _config_mismatches(a, b)

    sources, head_problems, writes_head = _pair_names(a, b)
    problems += head_problems
    t_values, t_problems = _t_values(list(sources), t, extrapolate)
    problems += t_problems

    tensors: list[PlannedTensor] = []
    for name, (source_a, source_b) in sources.items():
        info_a, info_b = a.info(source_a), b.info(source_b)
        where = f"tensor {name!r}"

        if info_a.shape != info_b.shape:
            problems.append(_shape_problem(where, a, b, info_a.shape, info_b.shape))
            continue
        if info_a.dtype != info_b.dtype:
            problems.append(
                f"{where}: dtype {info_a.dtype_name} in {a.source} but {info_b.dtype_name} in "
                f"{b.source}; convert one model so that both use the same dtype"
            )
            continue

        if name not in t_values:
            continue

        if info_a.dtype in MERGEABLE_DTYPES:
            method = Method.LERP if lerp_vectors and len(info_a.shape) == 1 else Method.SLERP
            target = out_dtype
        else:
            method, target = Method.COPY, info_a.dtype
            if bytes(a.view(source_a).reshape(-1).view(torch.uint8)) != bytes(
                b.view(source_b).reshape(-1).view(torch.uint8)
            ):
                problems.append(
                    f"{where}: {info_a.dtype_name} tensors cannot be interpolated and differ "
                    "between the models; fastmerge copies such tensors only when both agree"
                )
                continue

        tensors.append(
            PlannedTensor(
                name,
                info_a.shape,
                info_a.dtype,
                target,
                method,
                t_values[name],
                source_a,
                source_b,
                shard=-1,
            )
        )

    if not sources:
        problems.append(f"{a.source} holds no tensors")
    if problems:
        raise PlanError(problems)

    tensors, shard_names = _assign_shards(tensors, shard_size)
    knows_head = any(embedding in a.tensors for _, embedding in TIED_HEADS)
    config = _output_config(a.config, out_dtype, tied=not writes_head if knows_head else None)
    return MergePlan(a, b, tensors, shard_names, out_dtype, t, config, extrapolate=extrapolate)


def _t_values(
    names: list[str], t: float | Callable[[str], float], extrapolate: bool
) -> tuple[dict[str, float], list[str]]:
    """The t of every tensor that has a valid one, and the problems of the others."""
    values: dict[str, float] = {}
    problems: list[str] = []
    unmatched: list[str] = []
    for name in names:
        try:
            tensor_t = float(t(name)) if callable(t) else t
        except UnmatchedTensor:
            unmatched.append(name)
            continue
        except PlanError as exc:
            problems += exc.problems
            continue

        where = f"tensor {name!r}"
        if not math.isfinite(tensor_t):
            problems.append(f"{where}: t = {tensor_t} is not a number")
        elif not (extrapolate or 0.0 <= tensor_t <= 1.0):
            problems.append(
                f"{where}: t = {tensor_t} is outside [0, 1]; pass --extrapolate to allow it"
            )
        else:
            values[name] = tensor_t

    if unmatched:
        problems.append(
            _list_problem("match no entry of the t schedule", unmatched)
            + "; add a last entry without a filter (`- value: 0.5`, or `--t 0.5`) for the rest"
        )
    return values, problems


def _config_mismatches(a: Checkpoint, b: Checkpoint) -> list[str]:
    if a.config is None or b.config is None:
        return []
    problems = []
    for key in CONFIG_IDENTITY_KEYS:
        if a.config.get(key) != b.config.get(key):
            problems.append(
                f"config.json {key} differs: {a.config.get(key)!r} in {a.source} but "
                f"{b.config.get(key)!r} in {b.source}; merging different architectures is "
                "rarely meaningful (pass --allow-architecture-mismatch if you mean it)"
            )
    return problems


def _is_tied(checkpoint: Checkpoint) -> bool:
    config = checkpoint.config or {}
    return bool(config.get("tie_word_embeddings", True))


def _pair_names(a: Checkpoint, b: Checkpoint) -> tuple[dict[str, tuple[str, str]], list[str], bool]:
    """Output name -> (name in a, name in b), in a's file order; problems; writes a head."""
    problems: list[str] = []
    names_a, names_b = list(a.tensors), set(b.tensors)
    sources = {name: (name, name) for name in names_a if name in names_b}
    writes_head = False

    for head, embedding in TIED_HEADS:
        in_a, in_b = head in a.tensors, head in b.tensors
        if in_a == in_b or embedding not in a.tensors or embedding not in b.tensors:
            continue

        # One side ties its head to the embeddings: that side contributes its embedding matrix
        # and the output gets an untied head.
        tied_side = b if in_a else a
        if not _is_tied(tied_side):
            problems.append(
                f"{tied_side.source} has no {head} and its config.json says "
                "tie_word_embeddings is false: the checkpoint is incomplete"
            )
            continue
        sources[head] = (head, embedding) if in_a else (embedding, head)
        writes_head = True

    missing_in_b = [n for n in names_a if n not in names_b and n not in sources]
    extra_in_b = [n for n in b.tensors if n not in a.tensors and n not in sources]
    if missing_in_b:
        problems.append(_list_problem(f"missing from {b.source}", missing_in_b))
    if extra_in_b:
        problems.append(_list_problem(f"in {b.source} but not in {a.source}", extra_in_b))

    writes_head = writes_head or any(head in sources for head, _ in TIED_HEADS)
    return sources, problems, writes_head


def _list_problem(what: str, names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"{len(names)} tensor(s) {what}: {shown}{more}"


def _shape_problem(
    where: str, a: Checkpoint, b: Checkpoint, shape_a: tuple[int, ...], shape_b: tuple[int, ...]
) -> str:
    message = f"{where}: shape {list(shape_a)} in {a.source} but {list(shape_b)} in {b.source}"
    is_vocabulary = (
        len(shape_a) == len(shape_b) == 2
        and shape_a[1] == shape_b[1]
        and any(where.endswith(f"{n!r}") for pair in TIED_HEADS for n in pair)
    )
    if is_vocabulary:
        message += (
            f"; the vocabularies differ ({shape_a[0]} vs {shape_b[0]} tokens): the models use "
            "different tokenizers. Merge models that share a tokenizer, or resize one model's "
            "embeddings to match (transformers: model.resize_token_embeddings) first"
        )
    else:
        message += "; the models are not the same architecture or size"
    return message


def _assign_shards(
    tensors: list[PlannedTensor], shard_size: int
) -> tuple[list[PlannedTensor], list[str]]:
    """Cut the output into shards of at most shard_size bytes, in order, like transformers.

    A tensor larger than the shard size gets a shard of its own. Within a shard, tensors of
    wider dtypes come first so that every tensor's offset is aligned to its element size.
    """
    shards: list[list[PlannedTensor]] = [[]]
    filled = 0
    for planned in tensors:
        if shards[-1] and filled + planned.out_nbytes > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(planned)
        filled += planned.out_nbytes

    count = len(shards)
    names = (
        ["model.safetensors"]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    ordered = [
        _with_shard(planned, index)
        for index, members in enumerate(shards)
        for planned in sorted(members, key=lambda p: -p.out_dtype.itemsize)
    ]
    return ordered, names


def _with_shard(planned: PlannedTensor, shard: int) -> PlannedTensor:
    return PlannedTensor(**{**planned.__dict__, "shard": shard})


def _output_config(
    config: dict | None, out_dtype: torch.dtype, *, tied: bool | None
) -> dict | None:
    """The base model's config, its dtype fields and tie_word_embeddings made true.

    `tied` is None for architectures whose head fastmerge does not know; their config keeps
    its own tie_word_embeddings.
    """
    if config is None:
        return None
    out = copy.deepcopy(config)
    dtype_name = str(out_dtype).removeprefix("torch.")
    sections = [out] + [v for v in out.values() if isinstance(v, dict) and "model_type" in v]
    for section in sections:
        for key in ("torch_dtype", "dtype"):
            if key in section:
                section[key] = dtype_name
    if "torch_dtype" not in out and "dtype" not in out:
        out["torch_dtype"] = dtype_name
    if tied is not None:
        out["tie_word_embeddings"] = tied
    return out
