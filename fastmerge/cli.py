"""The `fastmerge` command line: a thin layer over the Python API that owns the terminal.

Bad input gets one paragraph on stderr and exit code 2 (a traceback only with --debug); an
interrupt exits with 130 and leaves no output behind.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import FastmergeError
from .plan import DEFAULT_SHARD_SIZE, OUTPUT_DTYPES

app = typer.Typer(
    name="fastmerge",
    help="Streaming SLERP merges of safetensors checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback when something fails.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
RayOption = Annotated[
    Optional[str],  # noqa: UP045 (typer needs Optional on 3.10)
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run on Ray, one task per output shard (pip install 'fastmerge[ray]'): 'local' "
        "starts Ray on this machine for this merge, 'auto' joins the cluster `ray start` runs "
        "here, HOST:6379 or ray://HOST:10001 a cluster's head. Inputs and output must be on "
        "storage every node sees.",
    ),
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '2GiB' or a plain number of bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a size; write bytes (1000000) or 5GB, 2GiB")
    number, unit = match.groups()
    unit = (unit or "").lower().removesuffix("b")
    return int(float(number) * _UNITS[unit])


def _literal(text: object) -> str:
    """Text from a checkpoint (tensor names, paths) shown as is, never read as Rich markup."""
    from rich.markup import escape

    return escape(str(text))


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


@contextmanager
def _reported_errors(debug: bool) -> Iterator[None]:
    """Turn fastmerge's errors into a message and an exit code (or a traceback with --debug)."""
    try:
        yield
    except FastmergeError as exc:
        if debug:
            raise
        _stderr().print(f"[bold red]error:[/] {_literal(exc)}", markup=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        if debug:
            raise
        _stderr().print("interrupted: nothing was written to the output")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except OSError as exc:
        if debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        _stderr().print(
            f"[bold red]error:[/] {_literal(exc.strerror or exc)}{_literal(where)}", markup=True
        )
        raise typer.Exit(1) from None


@contextmanager
def _progress(quiet: bool, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich progress bar over output bytes, with throughput, on stderr when it is a terminal."""
    console = _stderr()
    if quiet or not console.is_terminal:
        yield None
        return

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _print_summary(result) -> None:
    console = _stdout()
    written_mb = result.bytes_written / 1e6
    console.print(
        f"merged {len(result.tensors)} tensors ({written_mb:,.1f} MB) in {result.seconds:.2f} s, "
        f"{result.gigabytes_per_second:.2f} GB/s, on {result.device}"
    )
    angles = result.angle_summary()
    angle_text = (
        f"angles min {angles[0]:.2f}°, median {angles[1]:.2f}°, max {angles[2]:.2f}°"
        if angles
        else "no angles"
    )
    console.print(
        f"branches: {result.count('slerp')} slerp, {result.count('lerp')} lerp, "
        f"{result.count('copy')} copied; {angle_text}"
    )
    console.print(f"output: {result.output}")


T_HELP = (
    "0 gives A, 1 gives B. A number (0.6), a gradient over the layers (0,0.5,0.3,0.7,1), or "
    "repeated with filters (--t self_attn=0,0.5,1 --t mlp=1,0.5,0 --t 0.5; first match wins)."
)


@app.command()
def slerp(
    a: Annotated[
        Path, typer.Argument(help="Base model: directory, index, .safetensors file or Hub id.")
    ],
    b: Annotated[Path, typer.Argument(help="The other model, of the same architecture.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output directory ('out-{t}' with --sweep).")
    ],
    t: Annotated[Optional[list[str]], typer.Option("--t", help=T_HELP)] = None,  # noqa: UP045 (typer needs Optional on 3.10)
    sweep: Annotated[
        Optional[str],  # noqa: UP045 (typer needs Optional on 3.10)
        typer.Option(help="Several t values (0.2,0.4,0.6) from one read of the inputs."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help=f"Output dtype: {'|'.join(OUTPUT_DTYPES)}.")
    ] = "float16",
    shard_size: Annotated[
        str, typer.Option(help="Largest output shard, in bytes (or 5GB, 2GiB).")
    ] = str(DEFAULT_SHARD_SIZE),
    device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing output once done.")] = False,
    lerp_vectors: Annotated[
        bool, typer.Option(help="Interpolate 1-D tensors (norms, biases) linearly.")
    ] = False,
    extrapolate: Annotated[bool, typer.Option(help="Allow t outside [0, 1].")] = False,
    allow_architecture_mismatch: Annotated[
        bool, typer.Option(help="Merge even if config.json names different architectures.")
    ] = False,
    ray: RayOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """SLERP-merge model A (the base) with model B at t into a new directory."""
    from .merge import sweep as sweep_merge
    from .schedule import Schedule

    with _reported_errors(debug), _progress(quiet, "merging") as on_progress:
        if sweep is not None:
            if t:
                raise FastmergeError("--sweep gives the t values; leave out --t")
            ts, outputs = _sweep_outputs(sweep, str(output))
        else:
            ts, outputs = [Schedule.from_cli(t) if t else 0.5], [output]
        results = sweep_merge(
            a,
            b,
            ts,
            outputs,
            dtype=dtype,
            shard_size=parse_size(shard_size),
            device=device,
            force=force,
            lerp_vectors=lerp_vectors,
            extrapolate=extrapolate,
            allow_architecture_mismatch=allow_architecture_mismatch,
            on_progress=on_progress,
            ray=ray,
        )
    if not quiet:
        for result in results:
            _print_summary(result)


def _sweep_outputs(values: str, template: str) -> tuple[list[float], list[Path]]:
    """The t values of --sweep and an output directory for each, from the -o template."""
    texts = [text.strip() for text in values.split(",") if text.strip()]
    try:
        ts = [float(text) for text in texts]
    except ValueError:
        raise FastmergeError(
            f"--sweep {values!r}: expected numbers separated by commas, such as 0.2,0.4,0.6"
        ) from None
    if "{t}" not in template:
        raise FastmergeError(
            f"--sweep writes one directory per t: put {{t}} in the output name, e.g. -o "
            f"'{template}-{{t}}'"
        )
    return ts, [Path(template.replace("{t}", text)) for text in texts]


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A mergekit SLERP recipe (YAML).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output directory.")],
    shard_size: Annotated[
        str, typer.Option(help="Largest output shard, in bytes (or 5GB, 2GiB).")
    ] = str(DEFAULT_SHARD_SIZE),
    device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Replace an existing output once done.")] = False,
    extrapolate: Annotated[bool, typer.Option(help="Allow t outside [0, 1].")] = False,
    ray: RayOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Run a mergekit SLERP recipe: models, slices, t schedules, dtype, out_dtype."""
    from .recipe import load_recipe

    with _reported_errors(debug), _progress(quiet, "merging") as on_progress:
        result = load_recipe(recipe).merge(
            output,
            shard_size=parse_size(shard_size),
            device=device,
            force=force,
            extrapolate=extrapolate,
            on_progress=on_progress,
            ray=ray,
        )
    if not quiet:
        _print_summary(result)


@app.command()
def inspect(
    a: Annotated[Path, typer.Argument(help="A model: directory, index or .safetensors file.")],
    b: Annotated[Optional[Path], typer.Argument(help="A second model to compare with.")] = None,  # noqa: UP045 (typer needs Optional on 3.10)
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Find every tensor of A (and B) holding NaN or infinity; exit 2 if any."
        ),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """List tensors, shapes and dtypes; with two models, the angle between each pair."""
    from rich.table import Table

    from .inspect import compare, describe, find_non_finite

    with _reported_errors(debug):
        if check:
            rows = find_non_finite([a] if b is None else [a, b])
        else:
            rows = describe(a) if b is None else compare(a, b)

    table = Table(box=None, header_style="bold")
    for column in rows.columns:
        table.add_column(column, justify="left" if column in ("tensor", "model") else "right")
    for row in rows.rows:
        table.add_row(*(_literal(cell) for cell in row))
    console = _stdout()
    if rows.rows or not check:
        console.print(table)
    console.print(_literal(rows.footer))
    if check and rows.rows:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def verify(
    output: Annotated[Path, typer.Argument(help="A directory written by fastmerge.")],
    debug: DebugOption = False,
) -> None:
    """Check a merged model against the checksums written with it; exit 2 if damaged."""
    from .manifest import MANIFEST_FILE
    from .verify import verify as verify_output

    with _reported_errors(debug):
        report = verify_output(output)
    if report.intact:
        _stdout().print(
            f"ok: {_literal(output)} is intact: {report.files} files, {report.tensors} tensors "
            f"({report.tensor_bytes:,} bytes); {report.checksums} checksums match {MANIFEST_FILE}"
        )
        return
    count = len(report.problems)
    lines = [f"  - {_literal(problem)}" for problem in report.problems]
    _stderr().print(
        f"[bold red]error:[/] {_literal(output)} is damaged "
        f"({count} problem{'s' if count > 1 else ''}):",
        *lines,
        sep="\n",
        markup=True,
    )
    raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to build the models and the merge.")
    ] = Path("fastmerge-demo"),
    t: Annotated[float, typer.Option("--t")] = 0.6,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda.")] = "auto",
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Build a SmolLM-135M-shaped base and instruct pair, and merge them at t = 0.6."""
    from .merge import merge
    from .synthetic import PRESETS, write_pair

    with _reported_errors(debug):
        shape = PRESETS["smollm-135m"]
        if not quiet:
            _stdout().print(
                f"building a SmolLM-135M-shaped pair ({shape.parameters / 1e6:.1f}M parameters, "
                f"bfloat16) in {directory}/"
            )
        directory.mkdir(parents=True, exist_ok=True)
        base, instruct = write_pair(directory, "smollm-135m", names=("base", "instruct"))
        with _progress(quiet, "merging") as on_progress:
            result = merge(
                base,
                instruct,
                directory / "merged",
                t,
                device=device,
                force=True,
                on_progress=on_progress,
            )
    if not quiet:
        _print_summary(result)


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fastmerge: %(levelname)s: %(message)s"))
    root = logging.getLogger("fastmerge")
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _terminate(signum, frame) -> None:
    # SIGTERM unwinds like Ctrl-C, so the output transaction removes its temporary files.
    raise KeyboardInterrupt


def main() -> None:
    _configure_logging()
    signal.signal(signal.SIGTERM, _terminate)
    app()
