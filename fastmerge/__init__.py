"""fastmerge: streaming SLERP merges of safetensors checkpoints.

>>> import fastmerge
>>> result = fastmerge.merge("base", "instruct", "merged", t=0.6)   # doctest: +SKIP
>>> merged = fastmerge.slerp(tensor_a, tensor_b, 0.6)                # doctest: +SKIP

For programs that merge many times (t sweeps, evolutionary merge searches), `Pair` plans
once and merges into directories, modules, state dicts or iterators, and `ResidentPair`
keeps both inputs in memory so that a new t costs one pass and no reads.
`fastmerge.distributed` runs merges (as parallel units of output shards) and farms on a Ray
cluster; ray is imported only there, and only when used.
"""

from .errors import CheckpointError, FastmergeError, MergeError, OutputError, PlanError
from .farm import ResidentPair
from .merge import MergedTensors, Pair, merge, slerp, sweep
from .result import MergeResult, TensorReport
from .schedule import Schedule
from .sinks import ModuleSink, StateDictSink

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FastmergeError",
    "MergeError",
    "MergeResult",
    "MergedTensors",
    "ModuleSink",
    "OutputError",
    "Pair",
    "PlanError",
    "ResidentPair",
    "Schedule",
    "StateDictSink",
    "TensorReport",
    "merge",
    "slerp",
    "sweep",
]
