"""Fused Triton SLERP kernels, shipped as ``fastmerge.kernels``.

Importing this module imports triton; fastmerge imports it only where a CUDA tensor is about
to be merged. Set ``TRITON_INTERPRET=1`` before the import to run the kernels on CPU tensors
in Triton's interpreter (tests do).
"""

from .slerp import (
    BLOCK_SIZE,
    INPUT_DTYPES,
    INTERPRETED,
    STATS_COLUMNS,
    SUPPORTED_DTYPES,
    blend_segments,
    bytes_moved,
    segment_statistics,
    slerp,
    slerp_segments,
)

__all__ = [
    "BLOCK_SIZE",
    "INPUT_DTYPES",
    "INTERPRETED",
    "STATS_COLUMNS",
    "SUPPORTED_DTYPES",
    "blend_segments",
    "bytes_moved",
    "segment_statistics",
    "slerp",
    "slerp_segments",
]
