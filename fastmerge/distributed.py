"""Merges beyond one machine, on Ray: shard-parallel units, and merge farms of resident workers.

Ray is imported only inside the functions that use it (`pip install 'fastmerge[ray]'`), so
`import fastmerge` never imports it.

A shard-parallel merge (`merge`, `sweep`, `fastmerge slerp --ray`) runs the single-process
merge's plan, cut into units of whole output shards:

    driver  open and plan once (every error before any byte is written); lock the output and
            make its temporary directory; submit one Ray task per unit
    unit    (any node) re-open both inputs, re-plan from the headers and check that the plan
            and the input files are the driver's; merge the unit's tensors, reading only their
            byte ranges, into a private directory; fsync; os.replace each finished shard into
            the temporary output; return metadata (reports, checksums), never weights
    driver  the index, config, tokenizer files, model card and manifest; then the rename into
            place, once every unit is done

Inputs and output must lie on storage every node sees, at the same paths. A unit is
idempotent: a retry writes a fresh private directory and replaces the same shard names with
the same bytes, so Ray may retry a unit whose worker died (`max_retries`). An error in a unit
(bad input, a full disk) is not retried: it cancels the other units and ends the merge with a
message naming the unit, its shards and the node, and no output.

A `Farm` keeps long-lived Ray actors, one per GPU or CPU slot, each holding a `ResidentPair`
with its statistics; the driver submits t values or schedules (with an optional evaluation
that runs inside the worker, next to the merged weights) and takes results in completion
order, a free worker taking the next candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from itertools import count
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .engine import select_engine
from .engine.cpu import CpuEngine, _torch_threads
from .errors import FastmergeError
from .farm import ResidentPair
from .manifest import write_manifest
from .merge import Pair, ProgressCallback, T, _write_companions, stream_each
from .plan import MergePlan
from .result import MergeResult, TensorReport
from .sinks import StateDictSink
from .writer import ShardWriter, write_index

logger = logging.getLogger(__name__)

LOCAL = "local"
"""Start a Ray instance on this machine for the call, and stop it after."""
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
"""Ray's shared-memory object store for a local instance: units and farm workers return
metadata only (weights never travel through it), so a small one is plenty."""
AUTO = "auto"
"""Join the cluster that `ray start` runs on this machine."""
DEFAULT_RETRIES = 3
"""Attempts after the first for a unit whose worker process or node died."""
UNIT_PREFIX = ".unit-"
"""Private directories of units inside the temporary output; a killed attempt leaves one."""
FAULTS_ENV = "FASTMERGE_TEST_FAULTS"
"""Test hook (tests/test_ray.py): a directory of trigger files that make units kill their
worker mid-unit; see `_fault_point`."""


class DistributedError(FastmergeError):
    """A unit of a distributed merge, or a farm worker, failed; the message says which, where
    and why."""


class UnitFailure(FastmergeError):
    """Raised inside a Ray task or actor: the node it ran on, and the message for people."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(node, message)
        self.node = node
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (on {self.node})"


# Connecting.


def import_ray() -> ModuleType:
    """The ray module, or a FastmergeError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise FastmergeError(
            f"running on Ray needs the ray package, which does not import ({exc}); install "
            "it with: pip install 'fastmerge[ray]'"
        ) from None
    return ray


@contextmanager
def ray_session(address: str = LOCAL) -> Iterator[ModuleType]:
    """Ray, connected, for the duration of the block.

    A connection this process already has (the program called `ray.init` itself) is used as
    it is and left open. Otherwise `address` is "local" (a Ray instance on this machine,
    stopped at the end of the block), "auto" (the cluster `ray start` runs on this machine),
    HOST:PORT (a cluster's head) or ray://HOST:10001 (Ray Client); the connection is closed at
    the end of the block.
    """
    ray = import_ray()
    if ray.is_initialized():
        logger.info("using this process's Ray connection (%s asked for)", address)
        yield ray
        return

    if address not in (LOCAL, AUTO):
        _check_reachable(address)
    try:
        if address == LOCAL:
            ray.init(
                address="local",
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FastmergeError(
            f"cannot connect to Ray at {address!r} ({first_line}); start a cluster with "
            "`ray start --head` on one machine and `ray start --address HEAD:6379` on the "
            "others, then pass --ray auto (on a cluster machine) or --ray HEAD:6379, or use "
            "--ray local for this machine alone"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Refuse a head that does not answer at once: Ray itself retries for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FastmergeError(
            f"--ray {address!r}: expected local, auto, HOST:PORT (the head's GCS port, 6379 "
            "by default) or ray://HOST:PORT (Ray Client, 10001 by default)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise FastmergeError(
            f"cannot reach the Ray head at {host}:{port} ({exc.strerror or exc}); is "
            "`ray start --head` running there, and is the port open to this machine?"
        ) from None


# The units of a shard-parallel merge.


@dataclass(frozen=True)
class UnitSpec:
    """What one unit needs: picklable, small, and enough to rebuild the driver's plan."""

    index: int
    count: int
    shards: tuple[int, ...]
    a: str
    b: str
    ts: tuple[T, ...]
    directories: tuple[str, ...]
    """The temporary output directories, one per t."""
    options: dict[str, Any]
    """Pair's planning options: dtype, shard_size, lerp_vectors, extrapolate, ..."""
    device: str
    threads: int
    plan_digest: str
    inputs: dict[str, tuple[int, int]]
    """Each input file as the driver saw it: path -> (size, mtime_ns)."""


@dataclass
class UnitOutcome:
    """What a unit returns: metadata only, one entry per output for the lists."""

    index: int
    node: str
    engine: str
    shard_names: list[str]
    reports: list[list[TensorReport]]
    checksums: list[dict[str, int]]
    header_checksums: list[dict[str, int]]
    bytes_written: int
    seconds: float


def run_unit(spec: UnitSpec) -> UnitOutcome:
    """Merge one unit's shards into the temporary outputs (the body of a Ray task).

    Plain Python: it runs the same without Ray. Errors meant for people come out as
    UnitFailure naming the node; anything else is a bug and keeps its traceback.
    """
    node = socket.gethostname()
    try:
        return _merge_unit(spec, node)
    except FastmergeError as exc:
        raise UnitFailure(node, str(exc)) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise UnitFailure(node, f"{exc.strerror or exc}{where}") from None


def _merge_unit(spec: UnitSpec, node: str) -> UnitOutcome:
    started = time.perf_counter()
    cpu = spec.device == "cpu"
    engine = CpuEngine(threads=spec.threads) if cpu else select_engine(spec.device)

    with Pair(spec.a, spec.b, t=spec.ts[0], device=engine, **spec.options) as pair:
        _check_inputs(spec, pair.plan)
        plans = [pair.plan.with_t(t) for t in spec.ts]
        if plan_digest(plans) != spec.plan_digest:
            raise FastmergeError(
                f"the plan rebuilt from the headers of {spec.a} and {spec.b} differs from the "
                "driver's: this node reads other files under the same paths, or a different "
                "fastmerge version; install the same fastmerge on every node and keep the "
                "inputs on storage all nodes share"
            )
        units = [_only_shards(plan, spec.shards) for plan in plans]
        names = [plans[0].shard_names[shard] for shard in spec.shards]

        # A private directory per output, so that an attempt killed halfway never leaves a
        # partial file under a final name; mkdir without parents: if the driver has already
        # removed the temporary output (a cancelled merge), this attempt stops here.
        token = f"{spec.index + 1}-{os.getpid()}-{secrets.token_hex(4)}"
        privates = [Path(directory) / f"{UNIT_PREFIX}{token}" for directory in spec.directories]
        try:
            for private in privates:
                private.mkdir()
            reports: list[list[TensorReport]] = [[] for _ in units]
            with ExitStack() as writing:
                writers = [
                    writing.enter_context(
                        ShardWriter(private, unit, index=False, pin_memory=engine.pins_host_memory)
                    )
                    for private, unit in zip(privates, units, strict=True)
                ]
                # Statistics single-threaded, as the single-process CPU engine computes them:
                # a float64 dot split across threads may round differently.
                with _torch_threads(1) if cpu else nullcontext():
                    for position, (_, tensor_reports) in enumerate(
                        stream_each(units, engine, writers)
                    ):
                        for collected, report in zip(reports, tensor_reports, strict=True):
                            collected.append(report)
                        if position == 0:
                            _fault_point(names)

            # The shards hold what was read only if the inputs held still meanwhile.
            pair.plan.a.check_unchanged()
            pair.plan.b.check_unchanged()
            for private, directory in zip(privates, spec.directories, strict=True):
                for name in names:
                    os.replace(private / name, Path(directory) / name)
        finally:
            for private in privates:
                shutil.rmtree(private, ignore_errors=True)

    return UnitOutcome(
        index=spec.index,
        node=node,
        engine=engine.name,
        shard_names=names,
        reports=reports,
        checksums=[writer.checksums for writer in writers],
        header_checksums=[writer.header_checksums for writer in writers],
        bytes_written=sum(unit.output_bytes for unit in units),
        seconds=time.perf_counter() - started,
    )


def _only_shards(plan: MergePlan, shards: Iterable[int]) -> MergePlan:
    """The plan restricted to whole shards: the same shard names and order, fewer tensors."""
    wanted = set(shards)
    return replace(plan, tensors=[p for p in plan.tensors if p.shard in wanted])


def plan_digest(plans: Sequence[MergePlan]) -> str:
    """A digest of everything a unit's output bytes depend on: shards, tensors, t, dtypes."""
    digest = hashlib.sha256()
    for plan in plans:
        digest.update(json.dumps(plan.shard_names).encode())
        for p in plan.tensors:
            fields = (p.name, p.shape, str(p.in_dtype), str(p.out_dtype), p.method.value, p.t)
            digest.update(repr((*fields, p.source_a, p.source_b, p.shard)).encode())
    return digest.hexdigest()


def input_identities(plan: MergePlan) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every input file of a plan, as this process sees them."""
    files = [*plan.a.files, *plan.b.files]
    return {str(f.path): (f.identity.size, f.identity.mtime_ns) for f in files}


def _check_inputs(spec: UnitSpec, plan: MergePlan) -> None:
    here = input_identities(plan)
    for path, (size, mtime_ns) in spec.inputs.items():
        seen = here.get(path)
        if seen == (size, mtime_ns):
            continue
        found = "not among the inputs" if seen is None else f"{seen[0]:,} bytes, mtime {seen[1]}"
        raise FastmergeError(
            f"{path}: the driver saw {size:,} bytes, mtime {mtime_ns}, but this node finds "
            f"{found}; every node must read the same files: keep the inputs on storage all "
            "nodes share, at the same path, and do not change them during a merge"
        )


def _fault_point(shard_names: list[str]) -> None:
    """Test hook, mid-unit (after the first tensor): kill this worker if asked to.

    With FASTMERGE_TEST_FAULTS=DIR in the workers' environment, a file DIR/kill-SHARD makes
    the unit writing SHARD kill its own process with SIGKILL: on its first attempt only, or
    on every attempt if the file holds "always". Each kill appends a line to DIR/killed-SHARD.
    """
    faults = os.environ.get(FAULTS_ENV)
    if not faults:
        return
    for name in shard_names:
        trigger = Path(faults) / f"kill-{name}"
        if not trigger.is_file():
            continue
        killed = Path(faults) / f"killed-{name}"
        if trigger.read_text().strip() == "always" or not killed.exists():
            with open(killed, "a") as log:
                log.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)


# The driver of a shard-parallel merge.


@dataclass
class _GatheredShards:
    """The checksums of one output's shards, gathered from its units (manifest.WrittenShards)."""

    plan: MergePlan
    checksums: dict[str, int] = field(default_factory=dict)
    header_checksums: dict[str, int] = field(default_factory=dict)


def merge(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    t: T = 0.5,
    *,
    ray: str = LOCAL,
    **options: Any,
) -> MergeResult:
    """`fastmerge.merge` on Ray: the same output, byte for byte, written by parallel units.

    `ray` is "local", "auto", HOST:PORT or ray://HOST:10001 (see `ray_session`); `options`
    are fastmerge.merge's and sweep()'s (shards_per_unit, cpus_per_unit, max_retries).
    """
    return sweep(a, b, [t], [out], ray=ray, **options)[0]


def sweep(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    ts: Sequence[T],
    outs: Sequence[str | os.PathLike[str]],
    *,
    ray: str = LOCAL,
    device: str = "auto",
    force: bool = False,
    on_progress: ProgressCallback | None = None,
    shards_per_unit: int = 1,
    cpus_per_unit: int = 1,
    max_retries: int = DEFAULT_RETRIES,
    **options: Any,
) -> list[MergeResult]:
    """`fastmerge.sweep` on Ray: each unit reads its tensors once and writes its shards of
    every output; all outputs are moved into place at the end, or none.

    Units are `shards_per_unit` whole output shards each (the plan's shards, cut by
    `shard_size` exactly as without Ray, so at most as many units run at once as the output
    has shards). Each unit is a Ray task asking for `cpus_per_unit` CPUs (and one GPU when
    `device` is cuda; "auto" takes GPUs when the cluster has some). A unit whose worker dies
    is retried up to `max_retries` times. Raises FastmergeError on bad input, before anything
    is written, and DistributedError when a unit fails.
    """
    if len(ts) != len(outs) or not ts:
        raise FastmergeError(
            f"a sweep needs one output per t: {len(ts)} t value(s), {len(outs)} output(s)"
        )
    if shards_per_unit < 1 or cpus_per_unit < 1 or max_retries < 0:
        raise FastmergeError(
            f"shards_per_unit and cpus_per_unit must be at least 1 and max_retries at least 0; "
            f"got {shards_per_unit}, {cpus_per_unit} and {max_retries}"
        )
    started = time.perf_counter()

    with Pair(a, b, t=ts[0], device="cpu", **options) as pair:
        plans = [pair.plan.with_t(t) for t in ts]
        transactions = pair._transactions(outs, force)
        shards = list(range(len(plans[0].shard_names)))
        units = [
            tuple(shards[i : i + shards_per_unit]) for i in range(0, len(shards), shards_per_unit)
        ]

        with ray_session(ray) as ray_module, ExitStack() as outputs:
            unit_device = placement(ray_module, device, cpus_per_unit)
            _warn_if_few_units(ray_module, len(units), cpus_per_unit, unit_device)
            temporaries = [outputs.enter_context(transaction) for transaction in transactions]
            template = UnitSpec(
                index=0,
                count=len(units),
                shards=(),
                a=str(pair.plan.a.source),
                b=str(pair.plan.b.source),
                ts=tuple(ts),
                directories=tuple(str(directory) for directory in temporaries),
                options=options,
                device=unit_device,
                threads=min(2, cpus_per_unit),
                plan_digest=plan_digest(plans),
                inputs=input_identities(pair.plan),
            )
            specs = [replace(template, index=i, shards=unit) for i, unit in enumerate(units)]
            resources = {
                "num_cpus": cpus_per_unit,
                "num_gpus": 0 if unit_device == "cpu" else 1,
                "max_retries": max_retries,
                "retry_exceptions": False,
                "scheduling_strategy": "SPREAD",
            }
            total = sum(plan.output_bytes for plan in plans)
            outcomes = _run_units(ray_module, specs, resources, plans[0], on_progress, total)

            nodes = len({outcome.node for outcome in outcomes})
            device_name = f"ray: {len(units)} unit(s) on {nodes} node(s), {outcomes[0].engine}"
            results = [
                _finish_output(plan, temporary, Path(out), outcomes, position, pair, device_name)
                for position, (plan, temporary, out) in enumerate(
                    zip(plans, temporaries, outs, strict=True)
                )
            ]

            # The outputs hold what was read only if the inputs held still meanwhile.
            pair.plan.a.check_unchanged()
            pair.plan.b.check_unchanged()
            for transaction in transactions:
                transaction.commit()

    seconds = time.perf_counter() - started
    for result in results:
        result.seconds = seconds
    logger.info("merged %d output(s) in %.2f s on Ray", len(results), seconds)
    return results


def placement(ray: ModuleType, device: str, cpus: int, workers: int = 0) -> str:
    """The device units or workers run on ("auto": GPUs when the cluster has some), checked
    against the cluster: a request no node can meet, or `workers` long-lived actors the
    cluster cannot hold at once, would wait forever."""
    if device not in ("auto", "cpu", "cuda"):
        raise FastmergeError(
            f"on Ray, merges run on device cpu, cuda (one GPU each, which Ray assigns) or auto, "
            f"not {device!r}"
        )
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    gpus = sum(node.get("GPU", 0) for node in nodes)
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise FastmergeError(
            "device cuda: the Ray cluster has no GPU; use --device cpu, or add GPU nodes "
            "(`ray start --address HEAD:6379` on a machine with GPUs)"
        )
    largest = max((node.get("CPU", 0) for node in nodes), default=0)
    if largest < cpus:
        raise FastmergeError(
            f"each unit or worker asks for {cpus} CPU(s), but the largest node of the Ray "
            f"cluster has {largest:g}; ask for fewer"
        )
    if device == "cuda":
        slots, unit = int(gpus), "GPU"
    else:
        slots, unit = sum(int(node.get("CPU", 0) // cpus) for node in nodes), f"{cpus}-CPU"
    if workers > slots:
        raise FastmergeError(
            f"workers={workers} asks for {workers} {unit} slots, but the Ray cluster has "
            f"{slots}; start fewer workers or add nodes"
        )
    return device


def _warn_if_few_units(ray: ModuleType, units: int, cpus_per_unit: int, device: str) -> None:
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if device == "cuda":
        slots = sum(int(node.get("GPU", 0)) for node in nodes)
    else:
        slots = sum(int(node.get("CPU", 0) // cpus_per_unit) for node in nodes)
    if units < min(slots, max(2, len(nodes))):
        logger.warning(
            "the merge has %d unit(s) of whole output shards for %d worker slot(s), so only "
            "%d run at once; a smaller --shard-size (the output size divided by the slots) "
            "cuts the output into more shards",
            units,
            slots,
            units,
        )


def _run_units(
    ray: ModuleType,
    specs: list[UnitSpec],
    resources: dict[str, Any],
    plan: MergePlan,
    on_progress: ProgressCallback | None,
    total: int,
) -> list[UnitOutcome]:
    """Submit every unit and gather their outcomes as they finish; on the first failure (or
    an interrupt) cancel the rest, wait for them to stop, and raise."""
    task = ray.remote(run_unit)
    pending = {
        task.options(**resources, name=f"fastmerge-unit-{spec.index + 1}").remote(spec): spec
        for spec in specs
    }
    outcomes: list[UnitOutcome] = []
    done = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                raise _unit_error(ray, spec, plan, exc, resources["max_retries"]) from exc

            outcomes.append(outcome)
            done += outcome.bytes_written
            logger.info(
                "unit %d of %d (%s) done on %s in %.2f s",
                spec.index + 1,
                spec.count,
                ", ".join(outcome.shard_names),
                outcome.node,
                outcome.seconds,
            )
            if on_progress is not None:
                on_progress(done, total)
    except BaseException:
        _cancel(ray, list(pending))
        raise
    return sorted(outcomes, key=lambda outcome: outcome.index)


def _cancel(ray: ModuleType, refs: list) -> None:
    """Stop the units still queued or running, and wait (boundedly) until they have."""
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception as exc:  # already finished, or the cluster is gone: nothing to stop
            logger.debug("cancelling a unit: %s", exc)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=60)


def _unit_error(
    ray: ModuleType, spec: UnitSpec, plan: MergePlan, exc: Exception, retries: int
) -> DistributedError:
    shards = ", ".join(plan.shard_names[shard] for shard in spec.shards)
    where = f"unit {spec.index + 1} of {spec.count} ({shards})"
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, UnitFailure):
        what = f"failed on {cause.node}: {cause.message}"
    elif isinstance(cause, ImportError):
        node = getattr(exc, "ip", None) or "a worker"
        what = (
            f"failed on {node}: {cause}; install the same fastmerge and torch on every node of "
            "the cluster"
        )
    elif cause is not None:
        node = getattr(exc, "ip", None) or "a worker"
        what = f"failed on {node}: {type(cause).__name__}: {cause} (a bug: please report it)"
    else:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = (
            f"lost its worker {retries + 1} time(s) ({type(exc).__name__}: {first_line}); the "
            "process was killed, ran out of memory or its node left the cluster. Run again; if "
            "it repeats, give units more memory (fewer per node: raise cpus_per_unit) or more "
            "retries"
        )
    return DistributedError(
        f"{where} {what}; the merge stopped and no output was written (the other units were "
        "cancelled and the temporary directory removed)"
    )


def _finish_output(
    plan: MergePlan,
    temporary: Path,
    out: Path,
    outcomes: list[UnitOutcome],
    position: int,
    pair: Pair,
    device: str,
) -> MergeResult:
    """The driver's files of one output, written last: index, companions, manifest."""
    for leftover in temporary.glob(f"{UNIT_PREFIX}*"):  # from attempts whose worker died
        shutil.rmtree(leftover, ignore_errors=True)

    gathered = _GatheredShards(plan)
    by_name: dict[str, TensorReport] = {}
    for outcome in outcomes:
        gathered.checksums.update(outcome.checksums[position])
        gathered.header_checksums.update(outcome.header_checksums[position])
        by_name.update((report.name, report) for report in outcome.reports[position])
    assert set(by_name) == {p.name for p in plan.tensors}, "a unit left tensors out"

    result = MergeResult(out, device, [by_name[p.name] for p in plan.tensors])
    result.bytes_read = plan.input_bytes
    result.bytes_written = plan.output_bytes
    if len(plan.shard_names) > 1:
        write_index(temporary, plan)
    _write_companions(plan, temporary, *pair.names, result)
    write_manifest(temporary, gathered)
    return result


# Merge farms on Ray.


@dataclass
class FarmResult:
    """One finished candidate: what was asked, the merge's result, what evaluate returned."""

    ticket: int
    t: T
    result: MergeResult
    score: Any = None
    worker: int = 0
    output: Path | None = None


class FarmWorker:
    """The state of one farm actor: a resident pair, and the state dict (or the module built
    by `model`) it merges into and evaluates. Made a Ray actor by Farm; plain Python here."""

    def __init__(
        self,
        sources: tuple[str, str],
        names: tuple[str, str],
        memory_budget: int,
        device: str,
        model: Callable[[], torch.nn.Module] | None,
        options: dict[str, Any],
    ) -> None:
        self.node = socket.gethostname()
        self.failure: UnitFailure | None = None
        try:
            self.pair = ResidentPair(
                *sources, memory_budget=memory_budget, device=device, **options
            )
            self.pair.names = names  # the model card names the models as the driver was given
            self.module = model() if model is not None else None
            self.weights = StateDictSink(self.pair.engine.device)
        except FastmergeError as exc:  # handed over by describe(), where the driver waits
            self.failure = UnitFailure(self.node, str(exc))

    def describe(self) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        return {
            "node": self.node,
            "pid": os.getpid(),
            "device": str(self.pair.engine.device),
            "resident_bytes": self.pair.resident_bytes,
            "load_seconds": self.pair.load_seconds,
        }

    def merge(
        self, t: T, into: str | None, evaluate: Callable[[Any], Any] | None, force: bool
    ) -> tuple[MergeResult, Any]:
        in_memory = self.module if self.module is not None else self.weights
        targets: list[Any] = [into] if into is not None else []
        if evaluate is not None or into is None:
            targets.append(in_memory)
        try:
            result = self.pair.sweep([t] * len(targets), targets, force=force)[0]
        except FastmergeError as exc:
            raise UnitFailure(self.node, str(exc)) from None
        if evaluate is None:
            return result, None
        return result, evaluate(self.module if self.module is not None else self.weights.state_dict)


@dataclass
class _Job:
    ticket: int
    t: T
    into: str | None
    evaluate: Callable[[Any], Any] | None
    force: bool


class Farm:
    """Long-lived Ray actors, each holding both inputs resident with their statistics.

    `workers` actors start on the cluster, each asking for `cpus_per_worker` CPUs, or one GPU
    with device="cuda"; each loads a ResidentPair within `memory_budget` bytes (the pair is
    checked from its headers on the driver first). `submit` queues a candidate (a t or a
    schedule) and hands it to the next free worker; `next` returns whichever candidate
    finishes first. `into` writes a directory (on storage the driver can see); `evaluate`, a
    function run inside the worker, gets the merged state dict (or the module `model` built
    once per worker, merged in place) and its return value comes back as `score`: weights
    never leave the worker. Close the farm (or use it as a context manager) to stop the
    actors. `options` are Pair's: dtype, lerp_vectors, extrapolate, ...
    """

    def __init__(
        self,
        a: str | os.PathLike[str],
        b: str | os.PathLike[str],
        *,
        workers: int = 1,
        memory_budget: int,
        device: str = "cpu",
        ray: str = LOCAL,
        cpus_per_worker: int = 1,
        model: Callable[[], torch.nn.Module] | None = None,
        restarts: int = 1,
        **options: Any,
    ) -> None:
        if workers < 1 or cpus_per_worker < 1:
            raise FastmergeError(
                f"a farm needs at least one worker of at least one CPU; got workers={workers}, "
                f"cpus_per_worker={cpus_per_worker}"
            )
        with Pair(a, b, device="cpu", **options) as pair:  # every plan problem, here and now
            sources = str(pair.plan.a.source), str(pair.plan.b.source)
            names = pair.names

        self._stack = ExitStack()
        self._ray = self._stack.enter_context(ray_session(ray))
        self._workers: list[Any] = []
        self._tickets = count()
        self._queue: deque[_Job] = deque()
        self._running: dict[Any, tuple[int, _Job]] = {}
        try:
            worker_device = placement(self._ray, device, cpus_per_worker, workers)
            actor = self._ray.remote(FarmWorker).options(
                num_cpus=cpus_per_worker,
                num_gpus=0 if worker_device == "cpu" else 1,
                max_restarts=restarts,
                max_task_retries=restarts,
            )
            self._workers = [
                actor.remote(sources, names, memory_budget, worker_device, model, options)
                for _ in range(workers)
            ]
            try:
                self.workers_info = self._ray.get([w.describe.remote() for w in self._workers])
            except self._ray.exceptions.RayError as exc:
                raise self._error("loading the pair", None, exc) from exc
        except BaseException:
            self.close()
            raise
        self._idle = deque(range(workers))

    @property
    def pending(self) -> int:
        """Candidates submitted and not yet returned by `next`."""
        return len(self._queue) + len(self._running)

    def submit(
        self,
        t: T,
        *,
        into: str | os.PathLike[str] | None = None,
        evaluate: Callable[[Any], Any] | None = None,
        force: bool = False,
    ) -> int:
        """Queue a merge at `t`; returns its ticket (FarmResult.ticket)."""
        ticket = next(self._tickets)
        self._queue.append(_Job(ticket, t, None if into is None else str(into), evaluate, force))
        self._dispatch()
        return ticket

    def next(self, timeout: float | None = None) -> FarmResult:
        """The next candidate to finish, whichever it is; raises TimeoutError after `timeout`
        seconds without one, DistributedError if it failed (the farm stays usable)."""
        if not self._running:
            raise FastmergeError("the farm has nothing running: submit a candidate first")
        ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=timeout)
        if not ready:
            raise TimeoutError(f"no candidate finished within {timeout} s")
        worker, job = self._running.pop(ready[0])
        try:
            result, score = self._ray.get(ready[0])
        except self._ray.exceptions.RayError as exc:
            if isinstance(exc, self._ray.exceptions.RayActorError):
                worker = None  # dead for good: it takes no more candidates
            raise self._error(f"the candidate t={job.t!r}", job, exc) from exc
        finally:
            if worker is not None:
                self._idle.append(worker)
            self._dispatch()
        output = None if job.into is None else Path(job.into)
        return FarmResult(job.ticket, job.t, result, score, worker, output)

    def map(
        self,
        ts: Iterable[T],
        *,
        into: str | os.PathLike[str] | Callable[[T], str | os.PathLike[str]] | None = None,
        evaluate: Callable[[Any], Any] | None = None,
        force: bool = False,
    ) -> Iterator[FarmResult]:
        """Submit a merge at every t now; the iterator returned yields the results in the
        order they finish.

        `into` is None, a directory name with a `{t}` placeholder, or a function of t giving
        one. Needs an idle farm. Leaving the loop early (or a failed candidate) drops the
        candidates not yet started and waits for the running ones.
        """
        if self.pending:
            raise FastmergeError(
                f"map needs an idle farm, and {self.pending} candidate(s) are pending: take "
                "their results with next() first"
            )
        ts = list(ts)
        outputs = [_output_for(into, t, len(ts)) for t in ts]
        for t, output in zip(ts, outputs, strict=True):
            self.submit(t, into=output, evaluate=evaluate, force=force)
        return self._take(len(ts))

    def _take(self, count: int) -> Iterator[FarmResult]:
        try:
            for _ in range(count):
                yield self.next()
        finally:
            self._queue.clear()
            if self._running:
                self._ray.wait(list(self._running), num_returns=len(self._running))
                for worker, _ in self._running.values():
                    self._idle.append(worker)
                self._running.clear()

    def close(self) -> None:
        """Stop the actors (and the Ray instance the farm started, if it started one)."""
        if self._ray.is_initialized():  # else the program shut Ray, and the actors, down
            for worker in self._workers:
                self._ray.kill(worker)
        self._workers = []
        self._stack.close()

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            worker, job = self._idle.popleft(), self._queue.popleft()
            ref = self._workers[worker].merge.remote(job.t, job.into, job.evaluate, job.force)
            self._running[ref] = (worker, job)

    def _error(self, what: str, job: _Job | None, exc: Exception) -> DistributedError:
        task_error = isinstance(exc, self._ray.exceptions.RayTaskError)
        cause = getattr(exc, "cause", None) if task_error else None
        if isinstance(cause, UnitFailure):
            return DistributedError(f"{what} failed on {cause.node}: {cause.message}")
        if cause is not None:
            if job is not None and job.evaluate is not None:
                return DistributedError(f"{what}: evaluate raised {type(cause).__name__}: {cause}")
            return DistributedError(f"{what} failed: {type(cause).__name__}: {cause}")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return DistributedError(
            f"{what}: a farm worker died ({type(exc).__name__}: {first_line}); it was killed "
            "or ran out of memory: raise memory_budget headroom, or use fewer workers per node"
        )


def _output_for(
    into: str | os.PathLike[str] | Callable[[T], str | os.PathLike[str]] | None, t: T, many: int
) -> str | None:
    if into is None:
        return None
    if callable(into):
        return str(into(t))
    text = str(into)
    if "{t}" in text:
        return text.replace("{t}", str(t))
    if many > 1:
        raise FastmergeError(
            f"{many} candidates cannot all go into {text}: put {{t}} in the name "
            "('out-{t}') or pass a function of t"
        )
    return text
