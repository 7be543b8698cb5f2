"""fastmerge: streaming SLERP merges of safetensors checkpoints.

>>> import fastmerge
>>> result = fastmerge.merge("base", "instruct", "merged", t=0.6)   # doctest: +SKIP
>>> merged = fastmerge.slerp(tensor_a, tensor_b, 0.6)                # doctest: +SKIP
"""

from .errors import CheckpointError, FastmergeError, MergeError, OutputError, PlanError
from .merge import merge, slerp
from .result import MergeResult, TensorReport

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FastmergeError",
    "MergeError",
    "MergeResult",
    "OutputError",
    "PlanError",
    "TensorReport",
    "merge",
    "slerp",
]
