"""Fused SLERP of many tensor pairs on a GPU, in three Triton launches.

SLERP needs the norms of both inputs and their dot product before it can write a single
output element, so a merge is two passes over the data: one that reduces, one that blends.
Doing it with torch ops would read the inputs four or five times and materialise
fp32 temporaries as large as the tensor; here the inputs are read exactly twice and the
output written once, which is the floor for this math.

A merge holds hundreds of tensors, many of them small (biases, norms), so every kernel
works on a *group* of segments laid back to back in flat buffers: segment i is
``[offsets[i], offsets[i+1])`` with its own t. A program is one block of one segment; the
launcher builds the table that says which. One big tensor is the group of one.

1. ``_partials_kernel``: each block reduces a·a, b·b, a·b in fp32 into its own slot
   (no atomics, so the result does not depend on scheduling).
2. ``_coefficients_kernel``: one program per segment sums its blocks' partials in a fixed
   order in float64, then computes the angle and the two coefficients in float64, and
   writes them with the segment's statistics into a small float64 table on the device.
3. ``_blend_kernel``: each block computes ca·a + cb·b in fp32 and rounds once to the output
   dtype, to nearest even.

The math is the one in DESIGN.md ("SLERP, exactly"); `fastmerge.reference.slerp_reference`
is its float64 statement and the oracle the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastmerge.reference import DOT_THRESHOLD, NORM_EPS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Output dtypes the kernels write; inputs may also be float64."""

INPUT_DTYPES = (*SUPPORTED_DTYPES, torch.float64)

STATS_COLUMNS = ("norm_a", "norm_b", "cos", "theta", "branch", "ca", "cb")
"""Columns of the per-segment float64 statistics: branch is 1.0 for slerp, 0.0 for lerp."""

BLOCK_SIZE = 4096
"""Elements per program in the reducing and blending kernels (16 KiB of fp32 per input)."""

REDUCE_CHUNK = 1024
"""Partials the coefficients kernel sums per step of its loop over a segment's blocks."""

_NUM_WARPS = 8  # 256 threads, 16 elements each per BLOCK_SIZE block

_NORM_EPS = tl.constexpr(NORM_EPS)
_DOT_THRESHOLD = tl.constexpr(DOT_THRESHOLD)
_PI = tl.constexpr(3.141592653589793)

# Abramowitz & Stegun 4.4.46: acos(x) ≈ sqrt(1 - x)·Σ c_k x^k on [0, 1], |error| < 3e-8.
_ACOS_C0 = tl.constexpr(1.5707963050)
_ACOS_C1 = tl.constexpr(-0.2145988016)
_ACOS_C2 = tl.constexpr(0.0889789874)
_ACOS_C3 = tl.constexpr(-0.0501743046)
_ACOS_C4 = tl.constexpr(0.0308918810)
_ACOS_C5 = tl.constexpr(-0.0170881256)
_ACOS_C6 = tl.constexpr(0.0066700901)
_ACOS_C7 = tl.constexpr(-0.0012624911)


@triton.jit
def _acos_f64(x):
    # Triton has no acos (and the interpreter has no libdevice), so: a polynomial guess
    # good to 3e-8, then one Newton step on cos(y) = |x|, which squares the error (~4e-16).
    ax = tl.abs(x)
    one_minus = 1.0 - ax
    poly = _ACOS_C7 * ax + _ACOS_C6
    poly = poly * ax + _ACOS_C5
    poly = poly * ax + _ACOS_C4
    poly = poly * ax + _ACOS_C3
    poly = poly * ax + _ACOS_C2
    poly = poly * ax + _ACOS_C1
    poly = poly * ax + _ACOS_C0
    y = tl.sqrt(one_minus) * poly

    # The residual cos(y) - |x| written as (1 - |x|) - 2·sin²(y/2) keeps its digits when
    # y is tiny; at y = 0 (|x| = 1) the guess is already exact and the step is skipped.
    half_sin = tl.sin(0.5 * y)
    residual = one_minus - 2.0 * half_sin * half_sin
    sin_y = tl.sin(y)
    step = residual / tl.where(sin_y > 0.0, sin_y, 1.0)
    y = tl.where(sin_y > 0.0, y + step, y)

    return tl.where(x < 0.0, _PI - y, y)


@triton.jit
def _bf16_bits_rtne(x):
    # fp32 -> bf16 bit pattern, rounded to nearest even by hand: the interpreter converts by
    # truncation, and doing it here makes GPU and interpreter agree bit for bit. Adding
    # 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped
    # half is above the midpoint, or at it with an odd kept half; overflow lands on inf.
    bits = x.to(tl.uint32, bitcast=True)
    kept_lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + kept_lsb) >> 16

    # A NaN whose payload sits only in the dropped half would round to inf; keep it NaN.
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.int16)


@triton.jit
def _block_of(pid, offsets_ptr, block_segment_ptr, block_start_ptr, BLOCK: tl.constexpr):
    # A program's segment and its block's element offsets (64-bit), masked at the segment end.
    segment = tl.load(block_segment_ptr + pid).to(tl.int64)
    start = tl.load(block_start_ptr + pid)
    end = tl.load(offsets_ptr + segment + 1)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return segment, offs, offs < end


@triton.jit
def _partials_kernel(
    a_ptr,
    b_ptr,
    offsets_ptr,
    block_segment_ptr,
    block_start_ptr,
    partials_ptr,
    n_programs,
    ACC_F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Bytes: reads BLOCK elements of a and of b, writes 3 fp32 partials.
    pid = tl.program_id(0).to(tl.int64)
    _, offs, mask = _block_of(pid, offsets_ptr, block_segment_ptr, block_start_ptr, BLOCK)

    # fp32 per block, float64 across blocks (DESIGN.md); float64 where _wide_math says.
    acc = tl.float64 if ACC_F64 else tl.float32
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(acc)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(acc)

    # Stored as three rows of n_programs so the coefficients kernel reads them coalesced.
    tl.store(partials_ptr + pid, tl.sum(a * a, axis=0))
    tl.store(partials_ptr + n_programs + pid, tl.sum(b * b, axis=0))
    tl.store(partials_ptr + 2 * n_programs + pid, tl.sum(a * b, axis=0))


@triton.jit
def _coefficients_kernel(
    partials_ptr,
    segment_first_block_ptr,
    t_ptr,
    stats_ptr,
    n_programs,
    CHUNK: tl.constexpr,
):
    # Bytes: reads 12 per block of the segment, writes 7 float64 statistics per segment.
    segment = tl.program_id(0).to(tl.int64)
    first = tl.load(segment_first_block_ptr + segment)
    last = tl.load(segment_first_block_ptr + segment + 1)
    t = tl.load(t_ptr + segment).to(tl.float64)

    # Fixed order (lane k sums blocks k, k + CHUNK, ...; then a tree over lanes), so the
    # same input gives the same bits on every run.
    sum_aa = tl.zeros([CHUNK], dtype=tl.float64)
    sum_bb = tl.zeros([CHUNK], dtype=tl.float64)
    sum_ab = tl.zeros([CHUNK], dtype=tl.float64)
    for base in range(first, last, CHUNK):
        idx = base + tl.arange(0, CHUNK).to(tl.int64)
        mask = idx < last
        sum_aa += tl.load(partials_ptr + idx, mask=mask, other=0.0).to(tl.float64)
        sum_bb += tl.load(partials_ptr + n_programs + idx, mask=mask, other=0.0).to(tl.float64)
        sum_ab += tl.load(partials_ptr + 2 * n_programs + idx, mask=mask, other=0.0).to(tl.float64)
    aa = tl.sum(sum_aa, axis=0)
    bb = tl.sum(sum_bb, axis=0)
    ab = tl.sum(sum_ab, axis=0)

    norm_a = tl.sqrt(aa)
    norm_b = tl.sqrt(bb)
    scale_a = tl.where(norm_a > _NORM_EPS, norm_a, 1.0)
    scale_b = tl.where(norm_b > _NORM_EPS, norm_b, 1.0)
    # A NaN from a non-finite input must reach the outputs and the stats, not be clamped away.
    cos = tl.clamp(ab / (scale_a * scale_b), -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)

    # sin θ >= sin(acos(0.9995)) > 0.03 on the slerp branch; the lerp branch never divides.
    theta = _acos_f64(cos)
    is_lerp = tl.abs(cos) > _DOT_THRESHOLD
    sin_theta = tl.where(is_lerp, 1.0, tl.sin(theta))
    ca = tl.where(is_lerp, 1.0 - t, tl.sin((1.0 - t) * theta) / sin_theta)
    cb = tl.where(is_lerp, t, tl.sin(t * theta) / sin_theta)

    row = stats_ptr + segment * 7
    tl.store(row + 0, norm_a)
    tl.store(row + 1, norm_b)
    tl.store(row + 2, cos)
    tl.store(row + 3, theta)
    tl.store(row + 4, tl.where(is_lerp, 0.0, 1.0))
    tl.store(row + 5, ca)
    tl.store(row + 6, cb)


@triton.jit
def _blend_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    offsets_ptr,
    block_segment_ptr,
    block_start_ptr,
    stats_ptr,
    MATH_F64: tl.constexpr,
    OUT_BF16_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Bytes: reads BLOCK elements of a and of b, writes BLOCK elements of the output.
    pid = tl.program_id(0).to(tl.int64)
    segment, offs, mask = _block_of(pid, offsets_ptr, block_segment_ptr, block_start_ptr, BLOCK)

    # fp32 math cannot be one-ulp exact for an fp32 output where the terms nearly cancel, so
    # fp32 outputs (and float64 inputs) blend in float64, as the CPU engine does.
    math = tl.float64 if MATH_F64 else tl.float32
    ca = tl.load(stats_ptr + segment * 7 + 5).to(math)
    cb = tl.load(stats_ptr + segment * 7 + 6).to(math)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(math)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(math)

    # An explicit fma rounds the same on GPU and in the interpreter (which has a true fma);
    # a plain a*x + b*y could be contracted by the GPU compiler and not by the interpreter.
    # The selects make t = 0 give a and t = 1 give b bit for bit, -0.0 and all.
    # With ca == cb (t = 0.5), ca·(a + b) is one rounding (a + b is exact for inputs narrower
    # than the math dtype), and elements with a = -b give 0 as the reference does; the fma
    # would leave the rounding error of cb·b there.
    mixed = tl.fma(ca, a, cb * b)
    mixed = tl.where(ca == cb, ca * (a + b), mixed)
    mixed = tl.where(ca == 0.0, cb * b, mixed)
    mixed = tl.where(cb == 0.0, ca * a, mixed)

    if OUT_BF16_BITS:
        tl.store(out_ptr + offs, _bf16_bits_rtne(mixed.to(tl.float32)), mask=mask)
    else:
        # fp32 -> fp16 rounds to nearest even on the GPU and in the interpreter (numpy).
        tl.store(out_ptr + offs, mixed.to(out_ptr.dtype.element_ty), mask=mask)


# The kernels above run in Triton's interpreter when TRITON_INTERPRET=1 was set before this
# module was imported: triton.jit then returns an interpreted function, not a JITFunction.
INTERPRETED = not isinstance(_blend_kernel, triton.runtime.JITFunction)
"""Whether these kernels run in Triton's CPU interpreter (fixed at import)."""


def _check_flat(name: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if x.dtype not in dtypes:
        expected = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({expected}), found {x.dtype}")
    if x.dim() != 1:
        raise ValueError(
            f"{name}: expected a 1-D tensor, found shape {tuple(x.shape)}; flatten it with "
            ".reshape(-1)"
        )
    if not x.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor, found stride {x.stride()}; "
            "call .contiguous() first"
        )


def _wide_math(in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether sums and blend run in float64: for float32 outputs and float64 inputs, as in
    the CPU engine (fastmerge.slerp.compute_dtype). fp32 partials leave the coefficients
    good to ~1e-7, which is below an ulp of fp16 and bf16 but not of fp32 where the two
    terms nearly cancel."""
    return out_dtype == torch.float32 or in_dtype == torch.float64


@dataclass(frozen=True)
class _BlockTable:
    """Which segment each program works on, and where its block starts (on the device)."""

    block_segment: torch.Tensor
    block_start: torch.Tensor
    segment_first_block: torch.Tensor
    n_programs: int
    block_size: int


def _check_inputs(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, n: int) -> None:
    device = a.device
    for name, x in (("b", b), ("offsets", offsets)):
        if x.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} like a, found {x.device}")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "fastmerge.kernels got CPU tensors but Triton runs on GPUs; set TRITON_INTERPRET=1 "
            "before importing fastmerge.kernels to run them in the interpreter, or use the "
            "CPU engine"
        )

    _check_flat("a", a, INPUT_DTYPES)
    _check_flat("b", b, INPUT_DTYPES)
    _check_flat("offsets", offsets, (torch.int64,))
    if b.dtype != a.dtype:
        raise ValueError(f"b: expected dtype {a.dtype} like a, found {b.dtype}")
    if b.numel() != a.numel():
        raise ValueError(f"expected a and b of one length, found {a.numel()} and {b.numel()}")
    if offsets.numel() != n + 1:
        raise ValueError(
            f"offsets: expected {n + 1} entries (one more than t has), found {offsets.numel()}"
        )


def _block_table(offsets: torch.Tensor, numel: int, block_size: int) -> _BlockTable:
    """Built on the device. The offsets are the caller's contract (monotone, within
    [0, numel]); checking them would cost a host sync. A segment of length L has
    ceil(L / block) blocks, so the total is at most ceil(numel / block) + n: that many
    programs are launched. The spare ones count as further blocks of the last segment,
    which start past its end, so every one of their loads and stores is masked off."""
    assert block_size & (block_size - 1) == 0
    n = offsets.numel() - 1
    lengths = (offsets[1:] - offsets[:-1]).clamp_(min=0)
    blocks_per_segment = (lengths + (block_size - 1)) // block_size
    segment_first_block = torch.zeros(n + 1, dtype=torch.int64, device=offsets.device)
    torch.cumsum(blocks_per_segment, dim=0, out=segment_first_block[1:])

    n_programs = triton.cdiv(numel, block_size) + n
    program = torch.arange(n_programs, dtype=torch.int64, device=offsets.device)
    segment = torch.searchsorted(segment_first_block[1:], program, right=True).clamp_(max=n - 1)
    block_start = offsets[segment] + (program - segment_first_block[segment]) * block_size
    return _BlockTable(
        segment.to(torch.int32), block_start, segment_first_block, n_programs, block_size
    )


def _launch_statistics(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    t: torch.Tensor,
    table: _BlockTable,
    *,
    acc_f64: bool,
    reduce_chunk: int = REDUCE_CHUNK,
) -> torch.Tensor:
    """Partials and coefficients kernels: the [n, 7] float64 statistics, on the device."""
    assert reduce_chunk & (reduce_chunk - 1) == 0
    n = t.numel()
    stats = torch.empty((n, len(STATS_COLUMNS)), dtype=torch.float64, device=a.device)
    if n == 0:
        return stats

    partials = torch.empty(
        (3, table.n_programs), dtype=torch.float64 if acc_f64 else torch.float32, device=a.device
    )
    _partials_kernel[(table.n_programs,)](
        a, b, offsets, table.block_segment, table.block_start, partials, table.n_programs,
        ACC_F64=acc_f64, BLOCK=table.block_size, num_warps=_NUM_WARPS,
    )  # fmt: skip
    _coefficients_kernel[(n,)](
        partials, table.segment_first_block, t, stats, table.n_programs,
        CHUNK=reduce_chunk, num_warps=4,
    )  # fmt: skip
    return stats


def _launch_blend(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    stats: torch.Tensor,
    out: torch.Tensor,
    table: _BlockTable,
    *,
    math_f64: bool | None = None,
) -> None:
    """Blend kernel: out = ca·a + cb·b per segment, with ca, cb from the statistics."""
    if stats.numel() == 0:
        return
    if math_f64 is None:
        math_f64 = _wide_math(a.dtype, out.dtype)

    # bf16 goes out as int16 bit patterns rounded in the kernel (see _bf16_bits_rtne).
    out_bf16_bits = out.dtype == torch.bfloat16
    destination = out.view(torch.int16) if out_bf16_bits else out
    _blend_kernel[(table.n_programs,)](
        a, b, destination, offsets, table.block_segment, table.block_start, stats,
        MATH_F64=math_f64, OUT_BF16_BITS=out_bf16_bits, BLOCK=table.block_size,
        num_warps=_NUM_WARPS,
    )  # fmt: skip


def _output_for(a: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        if out_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"out_dtype: expected one of {SUPPORTED_DTYPES}, found {out_dtype}")
        return torch.empty(a.shape, dtype=out_dtype, device=a.device)
    if out.dtype != out_dtype:
        raise ValueError(
            f"out: expected dtype {out_dtype} (out_dtype), found {out.dtype}; pass "
            "out_dtype=out.dtype"
        )
    if out.device != a.device:
        raise ValueError(f"out: expected a tensor on {a.device} like a, found {out.device}")
    _check_flat("out", out, SUPPORTED_DTYPES)
    if out.numel() != a.numel():
        raise ValueError(f"out: expected {a.numel()} elements like a, found {out.numel()}")
    return out


def segment_statistics(
    a_flat: torch.Tensor,
    b_flat: torch.Tensor,
    offsets: torch.Tensor,
    t: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The [n, 7] float64 statistics of each segment (columns `STATS_COLUMNS`), on the device.

    Columns ca and cb are the coefficients at t; a caller may overwrite them (linear
    interpolation of some segments, say) before `blend_segments`. `out_dtype` is that of the
    blend to come: a float32 output needs float64 sums.
    """
    _check_inputs(a_flat, b_flat, offsets, t.numel())
    _check_flat("t", t, (torch.float32, torch.float64))
    if t.device != a_flat.device:
        raise ValueError(f"t: expected a tensor on {a_flat.device} like a, found {t.device}")
    table = _block_table(offsets, a_flat.numel(), BLOCK_SIZE)
    return _launch_statistics(
        a_flat, b_flat, offsets, t, table, acc_f64=_wide_math(a_flat.dtype, out_dtype)
    )


def blend_segments(
    a_flat: torch.Tensor,
    b_flat: torch.Tensor,
    offsets: torch.Tensor,
    stats: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = ca·a + cb·b per segment, with ca and cb from `stats` (as `segment_statistics`
    returns them, or built from cached statistics). Returns the output buffer."""
    n = stats.shape[0]
    _check_inputs(a_flat, b_flat, offsets, n)
    if stats.dtype != torch.float64 or stats.shape != (n, len(STATS_COLUMNS)):
        raise ValueError(
            f"stats: expected float64 [{n}, 7], found {stats.dtype}{tuple(stats.shape)}"
        )
    out = _output_for(a_flat, out_dtype, out)
    table = _block_table(offsets, a_flat.numel(), BLOCK_SIZE)
    _launch_blend(a_flat, b_flat, offsets, stats.contiguous(), out, table)
    return out


def slerp_segments(
    a_flat: torch.Tensor,
    b_flat: torch.Tensor,
    offsets: torch.Tensor,
    t: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float16,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP of many tensor pairs stored back to back in two flat buffers.

    Segment i is ``a_flat[offsets[i]:offsets[i+1]]`` with ``b_flat`` alike, merged with
    ``t[i]`` (float32 or float64; values outside [0, 1] extrapolate). ``offsets`` is int64
    with len(t) + 1 entries, non-decreasing, within [0, len(a_flat)]; it is not checked,
    since that would need a host sync. Elements outside every segment are not written.

    Returns ``(out_flat, stats)``: the merged buffer (``out`` when given, which must be a
    contiguous 1-D tensor like a_flat, of ``out_dtype``) and a float64 ``[n, 7]`` tensor with
    the columns of `STATS_COLUMNS`. All work is queued on the current stream.
    """
    _check_inputs(a_flat, b_flat, offsets, t.numel())
    _check_flat("t", t, (torch.float32, torch.float64))
    if t.device != a_flat.device:
        raise ValueError(f"t: expected a tensor on {a_flat.device} like a, found {t.device}")
    out = _output_for(a_flat, out_dtype, out)

    table = _block_table(offsets, a_flat.numel(), BLOCK_SIZE)
    wide = _wide_math(a_flat.dtype, out.dtype)
    stats = _launch_statistics(a_flat, b_flat, offsets, t, table, acc_f64=wide)
    _launch_blend(a_flat, b_flat, offsets, stats, out, table, math_f64=wide)
    return out, stats


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """SLERP of one pair of same-shaped contiguous tensors, on their device; same shape as a."""
    if a.shape != b.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} like a, found {tuple(b.shape)}")
    for name, x in (("a", a), ("b", b)):
        if not x.is_contiguous():
            raise ValueError(
                f"{name}: expected a contiguous tensor, found stride {x.stride()}; "
                "call .contiguous() first"
            )

    # Built on the device from scalars (arange, full), not copied from the host, so that
    # nothing here waits for the stream.
    device = a.device
    offsets = torch.arange(2, dtype=torch.int64, device=device) * a.numel()
    t_tensor = torch.full((1,), float(t), dtype=torch.float64, device=device)

    out, _ = slerp_segments(a.reshape(-1), b.reshape(-1), offsets, t_tensor, out_dtype=out_dtype)
    return out.reshape(a.shape)


def bytes_moved(numel: int, in_dtype: torch.dtype, out_dtype: torch.dtype) -> int:
    """Bytes a merge of ``numel`` elements moves: a and b read twice, the output written once.

    The per-block partials and per-segment statistics (tens of bytes per 4096 elements) are
    left out.
    """
    in_bytes, out_bytes = in_dtype.itemsize, out_dtype.itemsize
    return numel * (2 * 2 * in_bytes + out_bytes)
